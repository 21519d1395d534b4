// Host-side launch of the Hopper backward for one (dtype, head dim): the FA2 preprocess (Delta, lse_log2,
// zeroed dq_accum; family-neutral), then either
//   the dK/dV kernel with dQ added to fp32 dq_accum, and the dq convert (dq = dq_accum * scale in q's dtype
//   and layout; FA2's for a row-major dq_accum, bwd_dq.cuh's otherwise), or, deterministic,
//   the dK/dV kernel without dQ and the dQ kernel (bwd_dq_kernel.cuh; no dq_accum).
// The host op allocates the buffers as for FA2 (dispatch.cpp launch_fa2_bwd: seqlen_q_rounded a multiple of
// kBwdSeqRound, dq_accum non-null unless deterministic) and zeroes the gradients itself when there is no
// query row or no key. Varlen (cu_seqlens set): the kernels' varlen instantiations, grids counted by
// max_seqlen_q / max_seqlen_k, tensor maps over the packed rows.
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <type_traits>
#include "../fa2/bwd_preprocess.cuh"
#include "../launch.h"
#include "bwd_dq_kernel.cuh"
#include "bwd_kernel.cuh"
#include "tmaps.h"

namespace fae {

// The three launches, separately callable so a probe can time each; run_fa3_bwd is the backward.
template <typename T, int kHeadDim>
void fa3_bwd_preprocess(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows_padded = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_rounded;
  constexpr int kRowsPerBlock = kBwdAuxBlockThreads / kBwdRowThreads;
  fa2_bwd_preprocess_kernel<T, kHeadDim>
      <<<grid_size((rows_padded + kRowsPerBlock - 1) / kRowsPerBlock, "fa3_bwd preprocess"), kBwdAuxBlockThreads, 0,
         stream>>>(p);
  check_cuda(cudaGetLastError(), "fa3_bwd preprocess launch");
}

// Tensor maps for Q and dO (boxes of rows_q rows) and K and V (rows_kv rows), in that order.
struct Fa3BwdTmaps {
  CUtensorMap q, k, v, dout;
};
template <typename T, int kHeadDim>
Fa3BwdTmaps fa3_bwd_tmaps(const BwdParams& p, int rows_q, int rows_kv) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  return {fa3::q_side_tmap(p, p.q, kBf16, kHeadDim, p.q_batch_stride, p.q_head_stride, p.q_row_stride, rows_q),
          fa3::k_side_tmap(p, p.k, kBf16, kHeadDim, p.k_batch_stride, p.k_head_stride, p.k_row_stride, rows_kv),
          fa3::k_side_tmap(p, p.v, kBf16, kHeadDim, p.v_batch_stride, p.v_head_stride, p.v_row_stride, rows_kv),
          fa3::q_side_tmap(p, p.dout, kBf16, kHeadDim, p.do_batch_stride, p.do_head_stride, p.do_row_stride,
                           rows_q)};
}

inline void fa3_bwd_check_grid(const BwdParams& p) {
  if (p.heads_q > 65535 || p.batch > 65535) throw std::runtime_error("flashattn_ext: fa3_bwd grid exceeds the CUDA limit");
}

// dK, dV and (unless deterministic) dQ into dq_accum.
template <typename Tr, bool kWithDq, bool kVarlen>
void launch_fa3_bwd_dkdv_kernel(const BwdParams& p, const Fa3BwdTmaps& m, cudaStream_t stream) {
  constexpr auto kernel = fa3_bwd_dkdv_kernel<Tr, kWithDq, kVarlen>;
  set_smem_limit_once<kernel>(Tr::kSmemBytes, "fa3_bwd dkdv");
  const dim3 grid(grid_size((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, "fa3_bwd"), p.heads_kv, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, m.q, m.k, m.v, m.dout);
  check_cuda(cudaGetLastError(), "fa3_bwd dkdv launch");
}
template <typename T, int kHeadDim>
void fa3_bwd_dkdv(const BwdParams& p, cudaStream_t stream) {
  using Tr = Fa3BwdTraits<T, kHeadDim>;
  const Fa3BwdTmaps m = fa3_bwd_tmaps<T, kHeadDim>(p, Tr::kBlockM, Tr::kBlockN);
  fa3_bwd_check_grid(p);
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (p.deterministic) {
    if (varlen) launch_fa3_bwd_dkdv_kernel<Tr, false, true>(p, m, stream);
    else launch_fa3_bwd_dkdv_kernel<Tr, false, false>(p, m, stream);
  } else {
    if (varlen) launch_fa3_bwd_dkdv_kernel<Tr, true, true>(p, m, stream);
    else launch_fa3_bwd_dkdv_kernel<Tr, true, false>(p, m, stream);
  }
}

// Deterministic mode: dq straight from a kernel over query tiles.
template <typename Tr, bool kVarlen>
void launch_fa3_bwd_dq_kernel(const BwdParams& p, const Fa3BwdTmaps& m, cudaStream_t stream) {
  constexpr auto kernel = fa3_bwd_dq_kernel<Tr, kVarlen>;
  set_smem_limit_once<kernel>(Tr::kSmemBytes, "fa3_bwd dq");
  const dim3 grid(grid_size((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, "fa3_bwd dq"), p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, m.q, m.k, m.v, m.dout);
  check_cuda(cudaGetLastError(), "fa3_bwd dq launch");
}
template <typename T, int kHeadDim>
void fa3_bwd_dq(const BwdParams& p, cudaStream_t stream) {
  using Tr = Fa3BwdDqTraits<T, kHeadDim>;
  const Fa3BwdTmaps m = fa3_bwd_tmaps<T, kHeadDim>(p, Tr::kBlockM, Tr::kBlockN);
  fa3_bwd_check_grid(p);
  if (p.cu_seqlens_q != nullptr) launch_fa3_bwd_dq_kernel<Tr, true>(p, m, stream);
  else launch_fa3_bwd_dq_kernel<Tr, false>(p, m, stream);
}

template <typename T, int kHeadDim>
void fa3_bwd_convert_dq(const BwdParams& p, cudaStream_t stream) {
  using Tr = Fa3BwdTraits<T, kHeadDim>;
  const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q * (kHeadDim / 8);
  const unsigned grid = grid_size((chunks + kBwdAuxBlockThreads - 1) / kBwdAuxBlockThreads, "fa3_bwd convert");
  if constexpr (Tr::kDqBulk) {
    const auto kernel = p.cu_seqlens_q != nullptr ? fa3::fa3_bwd_convert_dq_kernel<Tr, true>
                                                  : fa3::fa3_bwd_convert_dq_kernel<Tr, false>;
    kernel<<<grid, kBwdAuxBlockThreads, 0, stream>>>(p);
  } else {
    fa2_bwd_convert_dq_kernel<T, kHeadDim><<<grid, kBwdAuxBlockThreads, 0, stream>>>(p);
  }
  check_cuda(cudaGetLastError(), "fa3_bwd convert_dq launch");
}

template <typename T, int kHeadDim>
void run_fa3_bwd(const BwdParams& p, cudaStream_t stream) {
  if (!p.deterministic && p.dq_accum == nullptr)
    throw std::runtime_error("flashattn_ext: fa3_bwd needs dq_accum unless deterministic");
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0 || p.seqlen_k == 0) return;
  fa3_bwd_preprocess<T, kHeadDim>(p, stream);
  fa3_bwd_dkdv<T, kHeadDim>(p, stream);
  if (p.deterministic) fa3_bwd_dq<T, kHeadDim>(p, stream);
  else fa3_bwd_convert_dq<T, kHeadDim>(p, stream);
}

}  // namespace fae
