// Kernel parameter structs: plain data, int64 strides, no Tensor. Filled by csrc/api/*.cpp.
#pragma once
#include <cstdint>

namespace fae {

// Q/K/V/O pointers and strides shared by every attention kernel. Layout is (batch, head, seq, dim) with any
// strides for the first three dims and a contiguous last dim.
struct QkvParams {
  const void* __restrict__ q;
  const void* __restrict__ k;
  const void* __restrict__ v;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int batch, heads_q, heads_kv, head_group;  // head_group = heads_q / heads_kv (GQA); kv head = h / head_group
  int seqlen_q, seqlen_k, head_dim;
};

struct FwdParams : QkvParams {
  void* __restrict__ o;
  float* __restrict__ lse;  // (batch, heads_q, seqlen_q) contiguous, natural log
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): softmax runs in base 2 so exp is one ex2.approx
  // Window in key positions around query position p = i + seqlen_k - seqlen_q (bottom-right aligned);
  // -1 = unbounded. causal is (-1, 0).
  int window_left, window_right;
};

// FlashAttention-1 forward keeps O, m and l in global memory between K/V tiles (the round trip FA2 removes).
struct Fa1FwdParams : FwdParams {
  float* __restrict__ o_acc;  // (batch, heads_q, seqlen_q, head_dim) contiguous, O normalised by l so far
  float* __restrict__ m;      // (batch, heads_q, seqlen_q) contiguous, running max (log2 domain)
  float* __restrict__ l;      // (batch, heads_q, seqlen_q) contiguous, running sum of exp2(score - m)
};

}  // namespace fae
