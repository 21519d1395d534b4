// Host-side launch of the FA1 backward for one (dtype, head dim): a single kernel, one block per (batch, head).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "bwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_bwd(const Fa1BwdParams& params, cudaStream_t stream) {
  using Tr = Fa1BwdTraits<T, kHeadDim>;
  // FA1's grid: one block per (batch, query head); every K/V tile and query tile is walked inside the block.
  if (params.seqlen_q == 0 || params.seqlen_k == 0) return;
  launch<fa1_bwd_kernel<Tr>>(static_cast<int64_t>(params.batch) * params.heads_q, Tr::kThreads, Tr::kSmemBytes,
                             params, stream, "fa1_bwd");
}

}  // namespace fae
