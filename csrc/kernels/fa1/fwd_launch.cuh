// Host-side launch of the FA1 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "fwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_fwd(const Fa1FwdParams& params, cudaStream_t stream) {
  using Tr = Fa1FwdTraits<T, kHeadDim>;
  // FA1's grid: one block per (batch, head); the whole sequence is walked inside the block.
  if (params.seqlen_q == 0) return;
  launch<fa1_fwd_kernel<Tr>>(static_cast<int64_t>(params.batch) * params.heads_q, Tr::kThreads, Tr::kSmemBytes,
                             params, stream, "fa1_fwd");
}

}  // namespace fae
