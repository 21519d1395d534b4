// Host-side launch of the FA2 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "fwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa2_fwd(const FwdParams& params, cudaStream_t stream) {
  using Tr = Fa2FwdTraits<T, kHeadDim>;
  auto kernel = fa2_fwd_kernel<Tr>;
  const int64_t num_m_blocks = (params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t blocks = num_m_blocks * params.batch * params.heads_q;
  if (blocks == 0) return;
  set_smem_limit(kernel, Tr::kSmemBytes, "fa2_fwd");
  kernel<<<grid_size(blocks, "fa2_fwd"), Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "fa2_fwd launch");
}

}  // namespace fae
