// decode_combine_kernel: the split-KV partials of each row merged in split order (see decode_common.cuh).
#pragma once
#include "decode_common.cuh"

namespace fae {

// Merges the num_splits fp32 partials of each (batch, head, query row): kHeadDim / 4 threads per row, 4 columns
// each, splits in order.
template <typename T, int kHeadDim>
__global__ void decode_combine_kernel(const __grid_constant__ KvCacheParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the split kernel (decode_launch.cuh): wait until that grid has
  // finished and its partials are visible. Without such a launch this returns at once.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  constexpr int kThreadsPerRow = kHeadDim / 4;
  constexpr int kRowsPerBlock = 128 / kThreadsPerRow;
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  if (row >= total_rows) return;
  const int c = (threadIdx.x % kThreadsPerRow) * 4;
  SoftmaxState st;
  st.init();
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t ws_row = s * total_rows + row;
    float fa, fb;
    st.merge(SoftmaxState::from_lse(p.ws_lse[ws_row]), fa, fb);
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (fb != 0.f) v = *reinterpret_cast<const float4*>(p.ws_o + ws_row * kHeadDim + c);
    acc.x = acc.x * fa + v.x * fb;
    acc.y = acc.y * fa + v.y * fb;
    acc.z = acc.z * fa + v.z * fb;
    acc.w = acc.w * fa + v.w * fb;
  }
  const float inv = st.inv_sum();
  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const SeqInfo seq(b, p.seqlen_q, 0);  // the cache is paged by block_table; q, o, new tokens per sequence
  T* o = seq.q_side(static_cast<T*>(p.o),
                    p.o_batch_stride, p.o_head_stride, p.o_row_stride, h) + i * p.o_row_stride + c;
  uint2 packed;
  packed.x = pack2<T>(acc.x * inv, acc.y * inv);
  packed.y = pack2<T>(acc.z * inv, acc.w * inv);
  *reinterpret_cast<uint2*>(o) = packed;
  if (c == 0) p.lse[row] = st.lse();
}

}  // namespace fae
