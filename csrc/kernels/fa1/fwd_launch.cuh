// Host-side launch of the FA1 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "fwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_fwd(const Fa1FwdParams& params, cudaStream_t stream) {
  using Tr = Fa1FwdTraits<T, kHeadDim>;
  auto kernel = fa1_fwd_kernel<Tr>;
  // FA1's grid: one block per (batch, head); the whole sequence is walked inside the block.
  const int64_t blocks = static_cast<int64_t>(params.batch) * params.heads_q;
  if (blocks == 0 || params.seqlen_q == 0) return;
  set_smem_limit(kernel, Tr::kSmemBytes, "fa1_fwd");
  kernel<<<grid_size(blocks, "fa1_fwd"), Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "fa1_fwd launch");
}

}  // namespace fae
