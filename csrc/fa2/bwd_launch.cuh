// Host-side launch of the FA2 backward for one (dtype, head dim): preprocess, then either
//   dK/dV/dQ kernel (dQ through fp32 atomics) + dq convert, or, deterministic,
//   dK/dV kernel + dQ kernel (no atomics; ~1.4x the FLOPs).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "bwd_dq_kernel.cuh"
#include "bwd_kernel.cuh"
#include "bwd_preprocess.cuh"

namespace fae {

inline void bwd_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("flashattn_ext: ") + what + ": " + cudaGetErrorString(err));
}

inline unsigned bwd_grid(int64_t blocks) {
  if (blocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: backward grid exceeds the CUDA grid limit");
  return static_cast<unsigned>(blocks);
}

// Opt a kernel into more than 48 KB of dynamic shared memory, once per kernel.
template <typename Kernel>
void bwd_set_smem(Kernel kernel, int bytes, const char* what) {
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
}

template <typename T, int kHeadDim>
void run_fa2_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows_padded = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_rounded;
  if (rows_padded == 0) return;
  constexpr int kRowsPerBlock = kBwdAuxBlockThreads / kBwdRowThreads;
  fa2_bwd_preprocess_kernel<T, kHeadDim>
      <<<bwd_grid((rows_padded + kRowsPerBlock - 1) / kRowsPerBlock), kBwdAuxBlockThreads, 0, stream>>>(p);
  bwd_check(cudaGetLastError(), "fa2_bwd_preprocess launch");

  using Tr = Fa2BwdTraits<T, kHeadDim>;
  const int64_t n_blocks = (p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN * p.batch * p.heads_kv;
  if (!p.deterministic) {
    auto kernel = fa2_bwd_dkdv_kernel<Tr, true>;
    static const bool attr = (bwd_set_smem(kernel, Tr::kSmemBytes, "cudaFuncSetAttribute(fa2_bwd)"), true);
    (void)attr;
    kernel<<<bwd_grid(n_blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    bwd_check(cudaGetLastError(), "fa2_bwd launch");
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q * (kHeadDim / 8);
    fa2_bwd_convert_dq_kernel<T, kHeadDim>
        <<<bwd_grid((chunks + kBwdAuxBlockThreads - 1) / kBwdAuxBlockThreads), kBwdAuxBlockThreads, 0, stream>>>(p);
    bwd_check(cudaGetLastError(), "fa2_bwd_convert_dq launch");
  } else {
    auto kernel = fa2_bwd_dkdv_kernel<Tr, false>;
    static const bool attr = (bwd_set_smem(kernel, Tr::kSmemBytes, "cudaFuncSetAttribute(fa2_bwd dkdv)"), true);
    (void)attr;
    kernel<<<bwd_grid(n_blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    bwd_check(cudaGetLastError(), "fa2_bwd dkdv launch");
    using TrQ = Fa2BwdDqTraits<T, kHeadDim>;
    auto dq_kernel = fa2_bwd_dq_kernel<TrQ>;
    static const bool attr_q = (bwd_set_smem(dq_kernel, TrQ::kSmemBytes, "cudaFuncSetAttribute(fa2_bwd dq)"), true);
    (void)attr_q;
    const int64_t m_blocks = (p.seqlen_q + TrQ::kBlockM - 1) / TrQ::kBlockM * p.batch * p.heads_q;
    dq_kernel<<<bwd_grid(m_blocks), TrQ::kThreads, TrQ::kSmemBytes, stream>>>(p);
    bwd_check(cudaGetLastError(), "fa2_bwd dq launch");
  }
}

}  // namespace fae
