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

inline unsigned bwd_grid(int64_t blocks) { return grid_size(blocks, "fa2_bwd"); }

template <typename T, int kHeadDim>
void run_fa2_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows_padded = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_rounded;
  if (rows_padded == 0) return;
  constexpr int kRowsPerBlock = kBwdAuxBlockThreads / kBwdRowThreads;
  fa2_bwd_preprocess_kernel<T, kHeadDim>
      <<<bwd_grid((rows_padded + kRowsPerBlock - 1) / kRowsPerBlock), kBwdAuxBlockThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "fa2_bwd_preprocess launch");

  using Tr = Fa2BwdTraits<T, kHeadDim>;
  const int64_t n_blocks = (p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN * p.batch * p.heads_kv;
  if (!p.deterministic) {
    auto kernel = fa2_bwd_dkdv_kernel<Tr, true>;
    set_smem_limit(kernel, Tr::kSmemBytes, "fa2_bwd");
    kernel<<<bwd_grid(n_blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "fa2_bwd launch");
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q * (kHeadDim / 8);
    fa2_bwd_convert_dq_kernel<T, kHeadDim>
        <<<bwd_grid((chunks + kBwdAuxBlockThreads - 1) / kBwdAuxBlockThreads), kBwdAuxBlockThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "fa2_bwd_convert_dq launch");
  } else {
    auto kernel = fa2_bwd_dkdv_kernel<Tr, false>;
    set_smem_limit(kernel, Tr::kSmemBytes, "fa2_bwd dkdv");
    kernel<<<bwd_grid(n_blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "fa2_bwd dkdv launch");
    using TrQ = Fa2BwdDqTraits<T, kHeadDim>;
    auto dq_kernel = fa2_bwd_dq_kernel<TrQ>;
    set_smem_limit(dq_kernel, TrQ::kSmemBytes, "fa2_bwd dq");
    const int64_t m_blocks = (p.seqlen_q + TrQ::kBlockM - 1) / TrQ::kBlockM * p.batch * p.heads_q;
    dq_kernel<<<bwd_grid(m_blocks), TrQ::kThreads, TrQ::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "fa2_bwd dq launch");
  }
}

}  // namespace fae
