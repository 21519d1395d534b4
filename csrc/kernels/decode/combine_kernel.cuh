// decode_combine_kernel: the split-KV partials of each row merged (see decode_common.cuh).
#pragma once
#include "decode_common.cuh"

namespace fae {

// One group of kHeadDim / 4 threads per (batch, head, query row), 4 columns each. Two passes over the splits,
// neither with a load that depends on another, so one row costs a few memory latencies, not one per split
// (a long sequence has 32-64 splits):
//   1. the row's total SoftmaxState: thread j folds the lse of splits j, j + kThreadsPerRow, ... in order with
//      SoftmaxState::merge, then the group merges its threads' states in a fixed butterfly (merge is
//      commutative bit for bit, so every thread ends with the same state): deterministic;
//   2. o = sum over splits, in split order, of exp(lse_s - lse) * o_s (o_s is normalised per split; a split that
//      saw no key has lse -inf, weight 0 and o_s = 0).
template <typename T, int kHeadDim>
__global__ void decode_combine_kernel(const __grid_constant__ KvCacheParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the split kernel (decode_launch.cuh): wait until that grid has
  // finished and its partials are visible. Without such a launch this returns at once.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  constexpr int kThreadsPerRow = kHeadDim / 4;
  constexpr int kRowsPerBlock = 128 / kThreadsPerRow;
  static_assert(kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0, "a row's threads lie in one warp");
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  // Rows past the end still take part in the shuffles (their lanes share a warp with live rows), reading row 0.
  const bool live = row < total_rows;
  const int64_t r = live ? row : 0;
  const int j = threadIdx.x % kThreadsPerRow, c = j * 4;

  SoftmaxState st;
  st.init();
  for (int s = j; s < p.num_splits; s += kThreadsPerRow) {
    float fa, fb;
    st.merge(SoftmaxState::from_lse(p.ws_lse[s * total_rows + r]), fa, fb);
  }
#pragma unroll
  for (int mask = 1; mask < kThreadsPerRow; mask <<= 1) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffff, st.m, mask), __shfl_xor_sync(0xffffffff, st.l, mask)};
    float fa, fb;
    st.merge(other, fa, fb);
  }
  if (!live) return;
  const float lse = st.lse();
  const float inv = st.inv_sum();  // 0 for a row no split saw a key of: weights 0, o = 0
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t ws_row = s * total_rows + r;
    const float ls = p.ws_lse[ws_row];
    const float4 v = *reinterpret_cast<const float4*>(p.ws_o + ws_row * kHeadDim + c);
    const float w = ls == -INFINITY ? 0.f : exp2f(ls * 1.44269504088896340736f - st.m) * inv;
    acc.x = fmaf(w, v.x, acc.x);
    acc.y = fmaf(w, v.y, acc.y);
    acc.z = fmaf(w, v.z, acc.z);
    acc.w = fmaf(w, v.w, acc.w);
  }
  const int i = static_cast<int>(r % p.seqlen_q);
  const int64_t bh = r / p.seqlen_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const SeqInfo seq(b, p.seqlen_q, 0);  // the cache is paged by block_table; q, o, new tokens per sequence
  T* o = seq.q_side(static_cast<T*>(p.o),
                    p.o_batch_stride, p.o_head_stride, p.o_row_stride, h) + i * p.o_row_stride + c;
  uint2 packed;
  packed.x = pack2<T>(acc.x, acc.y);
  packed.y = pack2<T>(acc.z, acc.w);
  *reinterpret_cast<uint2*>(o) = packed;
  if (c == 0) p.lse[r] = lse;
}

}  // namespace fae
