// Host-side launch of the FA2 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "fwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa2_fwd(const FwdParams& params, cudaStream_t stream) {
  using Tr = Fa2FwdTraits<T, kHeadDim>;
  const int64_t num_m_blocks = (params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  launch<fa2_fwd_kernel<Tr>>(num_m_blocks * params.batch * params.heads_q, Tr::kThreads, Tr::kSmemBytes, params,
                             stream, "fa2_fwd");
}

}  // namespace fae
