// Host-side launch of the FA2 backward for one (dtype, head dim): preprocess, then either
//   dK/dV/dQ kernel (dQ through fp32 atomics) + dq convert, or, deterministic,
//   dK/dV kernel + dQ kernel (no atomics; ~1.4x the FLOPs).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "bwd_dq_kernel.cuh"
#include "bwd_kernel.cuh"
#include "bwd_preprocess.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa2_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows_padded = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_rounded;
  if (rows_padded == 0) return;
  constexpr int kRowsPerBlock = kBwdAuxBlockThreads / kBwdRowThreads;
  launch<fa2_bwd_preprocess_kernel<T, kHeadDim>>((rows_padded + kRowsPerBlock - 1) / kRowsPerBlock,
                                                 kBwdAuxBlockThreads, 0, p, stream, "fa2_bwd_preprocess");

  using Tr = Fa2BwdTraits<T, kHeadDim>;
  const int64_t n_blocks = (p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN * p.batch * p.heads_kv;
  if (!p.deterministic) {
    launch<fa2_bwd_dkdv_kernel<Tr, true>>(n_blocks, Tr::kThreads, Tr::kSmemBytes, p, stream, "fa2_bwd");
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q * (kHeadDim / 8);
    launch<fa2_bwd_convert_dq_kernel<T, kHeadDim>>((chunks + kBwdAuxBlockThreads - 1) / kBwdAuxBlockThreads,
                                                   kBwdAuxBlockThreads, 0, p, stream, "fa2_bwd_convert_dq");
  } else {
    launch<fa2_bwd_dkdv_kernel<Tr, false>>(n_blocks, Tr::kThreads, Tr::kSmemBytes, p, stream, "fa2_bwd dkdv");
    using TrQ = Fa2BwdDqTraits<T, kHeadDim>;
    const int64_t m_blocks = (p.seqlen_q + TrQ::kBlockM - 1) / TrQ::kBlockM * p.batch * p.heads_q;
    launch<fa2_bwd_dq_kernel<TrQ>>(m_blocks, TrQ::kThreads, TrQ::kSmemBytes, p, stream, "fa2_bwd dq");
  }
}

}  // namespace fae
