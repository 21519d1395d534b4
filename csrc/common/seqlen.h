// Where sequence b starts and how long it is: the one place a kernel turns (batch, head) into a pointer, so a
// new input layout changes this file, not the kernels. Padded inputs (cu_seqlens null, as every op fills them
// today): sequence b is batch entry b, rows 0 .. seqlen - 1. Varlen (cu_seqlens set): sequences packed along the
// row dim of a (total_rows, heads, D) tensor, sequence b in rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1;
// seqused_k caps the keys sequence b attends to (e.g. a cache filled only so far). Per-row float buffers follow
// the same rule (lse_row0 / bwd_row0 below), so no kernel indexes a row buffer by a padded batch itself.
#pragma once
#include <cstdint>
#include "params.h"

namespace fae {

struct SeqInfo {
  int b;
  int64_t q_row0, k_row0;  // first packed row of sequence b (varlen); unused for padded inputs
  bool packed_q, packed_k;
  int seqlen_q, seqlen_k;

  // `padded_q` / `padded_k`: the lengths of padded inputs (params.seqlen_q / seqlen_k).
  __host__ __device__ __forceinline__ SeqInfo(int b_, int padded_q, int padded_k, const int* cu_seqlens_q = nullptr,
                                              const int* cu_seqlens_k = nullptr, const int* seqused_k = nullptr)
      : b(b_),
        q_row0(cu_seqlens_q ? cu_seqlens_q[b_] : 0),
        k_row0(cu_seqlens_k ? cu_seqlens_k[b_] : 0),
        packed_q(cu_seqlens_q != nullptr),
        packed_k(cu_seqlens_k != nullptr),
        seqlen_q(cu_seqlens_q ? cu_seqlens_q[b_ + 1] - cu_seqlens_q[b_] : padded_q),
        seqlen_k(seqused_k ? seqused_k[b_] : (cu_seqlens_k ? cu_seqlens_k[b_ + 1] - cu_seqlens_k[b_] : padded_k)) {}

  // Row 0 of head h of sequence b in a query-side tensor (q, o, dO, dQ, new tokens) with these strides.
  template <typename T>
  __host__ __device__ __forceinline__ T* q_side(T* base, int64_t batch_stride, int64_t head_stride,
                                                int64_t row_stride, int h) const {
    return base + (packed_q ? q_row0 * row_stride : b * batch_stride) + h * head_stride;
  }
  // Row 0 of kv head hk of sequence b in a key-side tensor (k, v, dK, dV).
  template <typename T>
  __host__ __device__ __forceinline__ T* k_side(T* base, int64_t batch_stride, int64_t head_stride,
                                                int64_t row_stride, int hk) const {
    return base + (packed_k ? k_row0 * row_stride : b * batch_stride) + hk * head_stride;
  }
  // Row 0 of query head h of sequence b in a per-row float buffer: padded (batch, heads_q, padded_rows), varlen
  // (heads_q, packed_rows) with the sequence at its packed rows.
  __host__ __device__ __forceinline__ int64_t row_buffer(int h, int heads_q, int64_t padded_rows,
                                                         int64_t packed_rows) const {
    return packed_q ? h * packed_rows + q_row0 : (static_cast<int64_t>(b) * heads_q + h) * padded_rows;
  }
  // The same for the backward's row buffers padded to whole kBwdSeqRound tiles (Delta, lse_log2, dq_accum).
  // Varlen: (heads_q, packed_rows_rounded = bwd_rows_per_head); sequence b starts at the multiple of
  // kBwdSeqRound at or below q_row0 + b * kBwdSeqRound, which leaves its rounded-up rows clear of sequence
  // b + 1's (flash-attn's rule), so every tile still loads whole chunks without bounds checks.
  __host__ __device__ __forceinline__ int64_t padded_row_buffer(int h, int heads_q, int64_t rows_rounded,
                                                                int64_t packed_rows_rounded) const {
    if (!packed_q) return (static_cast<int64_t>(b) * heads_q + h) * rows_rounded;
    return h * packed_rows_rounded + (q_row0 + static_cast<int64_t>(b) * kBwdSeqRound) / kBwdSeqRound * kBwdSeqRound;
  }
};

// The sequence of batch entry b of an attention params struct (QkvParams and everything derived from it).
template <typename Params>
__host__ __device__ __forceinline__ SeqInfo seq_info(const Params& p, int b) {
  return SeqInfo(b, p.seqlen_q, p.seqlen_k, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k);
}

// First row of (sequence, query head h) in lse / dlse: (batch, heads_q, seqlen_q) padded, (heads_q, total_q) varlen.
template <typename Params>
__host__ __device__ __forceinline__ int64_t lse_row0(const Params& p, const SeqInfo& seq, int h) {
  return seq.row_buffer(h, p.heads_q, p.seqlen_q, p.total_q);
}

// Rows per query head of the backward's padded row buffers: seqlen_q_rounded per (batch, head) when padded;
// varlen: total_q + batch * kBwdSeqRound rounded up to kBwdSeqRound, so every head starts 16-byte aligned (the
// 16-byte cp.async of lse_log2 / Delta). csrc/host/dispatch.cpp allocates with the same rule.
template <typename Params>
__host__ __device__ __forceinline__ int64_t bwd_rows_per_head(const Params& p) {
  if (p.cu_seqlens_q == nullptr) return p.seqlen_q_rounded;
  return (p.total_q + static_cast<int64_t>(p.batch) * kBwdSeqRound + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
}

// First row of (sequence, query head h) in the backward's padded row buffers (Delta, lse_log2; times head_dim in
// dq_accum). Rows seqlen .. round_up(seqlen, kBwdSeqRound) - 1 after it are the sequence's padding.
template <typename Params>
__host__ __device__ __forceinline__ int64_t bwd_row0(const Params& p, const SeqInfo& seq, int h) {
  return seq.padded_row_buffer(h, p.heads_q, p.seqlen_q_rounded, bwd_rows_per_head(p));
}

}  // namespace fae
