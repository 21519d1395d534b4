// Where sequence b starts and how long it is: the one place a kernel turns (batch, head) into a pointer, so a
// new input layout changes this file, not the kernels. Padded inputs (cu_seqlens null, as every op fills them
// today): sequence b is batch entry b, rows 0 .. seqlen - 1. Varlen (cu_seqlens set): sequences packed along the
// row dim of a (total_rows, heads, D) tensor, sequence b in rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1;
// seqused_k caps the keys sequence b attends to (e.g. a cache filled only so far).
#pragma once
#include <cstdint>

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
};

// The sequence of batch entry b of an attention params struct (QkvParams and everything derived from it).
template <typename Params>
__host__ __device__ __forceinline__ SeqInfo seq_info(const Params& p, int b) {
  return SeqInfo(b, p.seqlen_q, p.seqlen_k, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k);
}

}  // namespace fae
