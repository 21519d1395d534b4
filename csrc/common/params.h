// Kernel parameter structs: plain data, int64 strides, no Tensor. Filled by csrc/host/*.cpp. One chain:
// QkvParams (shared: pointers, strides, sizes; sequence part) -> FwdParams (output; mask part) -> BwdParams
// (gradient part) -> per-family extras (Fa1FwdParams, Fa1BwdParams).
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
  // Sequence part, read only through SeqInfo (seqlen.h). Null: padded batch of seqlen_q / seqlen_k rows.
  // Varlen (attention_varlen): (batch + 1) prefix sums of the packed query / key lengths, and the keys used per
  // sequence (null: all); seqlen_q / seqlen_k are then max_seqlen_q / max_seqlen_k (they size the grids; blocks
  // past a sequence's end exit) and total_q / total_k are the packed rows (total_q: the row count per head of lse;
  // both: the row extent of the Hopper family's tensor maps).
  const int* __restrict__ cu_seqlens_q;
  const int* __restrict__ cu_seqlens_k;
  const int* __restrict__ seqused_k;
  int total_q, total_k;
};

struct FwdParams : QkvParams {
  void* __restrict__ o;
  float* __restrict__ lse;  // (batch, heads_q, seqlen_q) contiguous, natural log; varlen (heads_q, total_q)
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): softmax runs in base 2 so exp is one ex2.approx
  // Mask part (mask.h). Window in key positions around query position p = i + seqlen_k - seqlen_q
  // (bottom-right aligned); -1 = unbounded. causal is (-1, 0).
  int window_left, window_right;
  // Longformer global keys (op fwd_global; flashattn_ext/global_tokens.py), read by the Hopper forward only.
  // The batch's global K/V rows gathered into contiguous (batch, heads_kv, num_global, D) buffers, and their key
  // positions (batch, num_global) int32, ascending, -1 past a sequence's own count. A query row counts, on top of
  // its window, the global keys its window leaves out (at positions <= its own when global_causal): the rule is
  // WindowMask::counts_global. num_global = 0: none (every other op).
  const void* __restrict__ global_k;
  const void* __restrict__ global_v;
  const int* __restrict__ global_pos;
  int num_global;
  bool global_causal;
};

// FlashAttention-1 forward keeps O, m and l in global memory between K/V tiles (the round trip FA2 removes).
struct Fa1FwdParams : FwdParams {
  float* __restrict__ o_acc;  // (batch, heads_q, seqlen_q, head_dim) contiguous, O normalised by l so far
  float* __restrict__ m;      // (batch, heads_q, seqlen_q) contiguous, running max (log2 domain)
  float* __restrict__ l;      // (batch, heads_q, seqlen_q) contiguous, running sum of exp2(score - m)
};

// Backward, every family. Inherits q/k/v, o (the forward output, read here), lse (saved by the forward), scale
// and window; adds dO, dlse and the gradients (one set of fields for FA2 and FA1).
struct BwdParams : FwdParams {
  const void* __restrict__ dout;  // dO, same shape as o, any strides (multiples of 8 elements, last dim contiguous)
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  void* __restrict__ dq;
  void* __restrict__ dk;  // FA1 with GQA: written by the host op from dk_accum instead
  void* __restrict__ dv;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  const float* __restrict__ dlse;  // optional gradient of lse, (batch, heads_q, seqlen_q) contiguous; may be null
  // FA2: (batch, heads_q, seqlen_q_rounded, head_dim) fp32, unscaled dQ; null if deterministic. Varlen: the
  // padded row buffers are (heads_q, bwd_rows_per_head) with sequences at bwd_row0 (seqlen.h).
  // FA1: (batch, heads_q, seqlen_q, head_dim) fp32, unscaled dQ between K/V tiles.
  float* __restrict__ dq_accum;
  // FA2 only. Written by the preprocess kernel, (batch, heads_q, seqlen_q_rounded) contiguous; rows past seqlen_q
  // are padding (delta 0, lse_log2 +inf) so the main kernels load whole tiles without bounds checks.
  float* __restrict__ dsoftmax_sum;  // Delta_i = rowsum(dO_i * O_i) - dlse_i
  float* __restrict__ lse_log2;      // lse * log2(e); +inf for rows that see no key, so P = exp2(s - lse) = 0
  int seqlen_q_rounded;              // multiple of kBwdSeqRound
  bool deterministic;
};

// Padding of the per-row FA2 backward buffers: a multiple of every backward kernel's query tile.
constexpr int kBwdSeqRound = 128;

// FlashAttention-1 backward (Algorithm 4). No padded buffers: every row buffer is seqlen_q long.
struct Fa1BwdParams : BwdParams {
  // GQA only (else null): (batch, heads_kv, seqlen_k, head_dim) fp32, zeroed; each query head's block adds its
  // scaled dK / dV here with atomics, the host op converts to dk / dv.
  float* __restrict__ dk_accum;
  float* __restrict__ dv_accum;
};

// Attention against a KV cache (csrc/decode: decode and chunked prefill). The cache is either paged, k_cache
// (num_pages, page_size, Hkv, D) with block_table (batch, max_pages) int32, or contiguous (batch, Hkv, S_max, D),
// which the launcher describes as one page of S_max rows per batch entry and block_table = null. Key position
// pos of batch b lives in page block_table[b][pos / page_size] (page b when contiguous), row pos % page_size.
struct KvCacheParams {
  const void* __restrict__ q;  // (batch, heads_q, seqlen_q, D)
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  void* k_cache;  // written by the append kernel, then read by the attention kernel (separate launches)
  void* v_cache;
  int64_t k_page_stride, k_row_stride, k_head_stride;
  int64_t v_page_stride, v_row_stride, v_head_stride;
  const int* __restrict__ block_table;  // null: contiguous cache
  int64_t block_table_stride;           // elements between batch rows of block_table
  int num_pages, page_size, max_pages;  // capacity per sequence = max_pages * page_size
  const int* __restrict__ cache_seqlens;  // (batch,) tokens in the cache before this call; read on the device only
  const void* __restrict__ k_new;  // (batch, heads_kv, seqlen_new, D) appended at cache_seqlens[b]; null: none
  const void* __restrict__ v_new;
  int64_t kn_batch_stride, kn_head_stride, kn_row_stride;
  int64_t vn_batch_stride, vn_head_stride, vn_row_stride;
  int seqlen_new;  // keys seen by batch b: cache_seqlens[b] + seqlen_new (seqlen_new = 0 without k_new)
  int batch, heads_q, heads_kv, head_group, seqlen_q, head_dim;
  void* __restrict__ o;      // (batch, heads_q, seqlen_q, D), q's dtype
  float* __restrict__ lse;   // (batch, heads_q, seqlen_q) contiguous, natural log
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  // Split-KV partials, fp32: o normalised per split, lse natural log (-inf for a split that saw no key).
  float* __restrict__ ws_o;    // (num_splits, batch, heads_q, seqlen_q, D) contiguous
  float* __restrict__ ws_lse;  // (num_splits, batch, heads_q, seqlen_q) contiguous
  int num_splits;    // 1: the attention kernel writes o and lse directly, no combine
  int num_m_blocks;  // blocks of packed (query row, head in group) rows per (batch, kv head)
  int split_variant;  // the split kernel's variant (decode_launch.cuh, FAE_DECODE_VARIANTS), chosen by the host
  float scale, scale_log2;
  int window_left, window_right;  // as FwdParams, around p = i + seqlen_k - seqlen_q (seqlen_k per batch)
  // (batch, seqlen_q) contiguous: row i of batch b sits at key position q_pos[b * seqlen_q + i] instead of
  // i + seqlen_k - seqlen_q (rows at arbitrary positions, e.g. Longformer's global rows); null: bottom-right.
  // Device values, only ever compared with key positions (clamped to +-2^30 first): any value is safe (a
  // negative one sees no key when causal).
  const int* __restrict__ q_pos;
};

// The host's view of a decode call's split kernel (decode_plan in decode_launch.cuh): which variant runs, how
// many of its blocks fit on an SM, and how many kv heads each block takes (its grid has batch * num_m_blocks *
// heads_kv / heads_per_block blocks per split), for the num_splits heuristic.
struct DecodePlan {
  int variant, blocks_per_sm, heads_per_block;
};

// merge_states: two partial attention results over disjoint key sets -> the result over their union.
// o_a, o_b (batch, heads, seqlen, head_dim) any strides, one dtype; lse (batch, heads, seqlen) fp32 natural log,
// any strides; outputs contiguous (o in the inputs' dtype).
struct MergeStatesParams {
  const void* __restrict__ o_a;
  const void* __restrict__ o_b;
  const float* __restrict__ lse_a;
  const float* __restrict__ lse_b;
  void* __restrict__ o;
  float* __restrict__ lse;
  int64_t oa_stride[4], ob_stride[4], la_stride[3], lb_stride[3];
  int batch, heads, seqlen, head_dim;
};

}  // namespace fae
