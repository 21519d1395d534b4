// kvcache_append_kernel: k_new / v_new into the cache at positions cache_seqlens[b] + i, clamped to the cache
// (see decode_common.cuh for the three decode kernels and their order).
#pragma once
#include "decode_common.cuh"

namespace fae {

template <typename T, int kHeadDim>
__global__ void kvcache_append_kernel(const __grid_constant__ KvCacheParams p) {
  constexpr int kCPR = kHeadDim / 8;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads_kv * p.seqlen_new * kCPR;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int c = static_cast<int>(idx % kCPR) * 8;
  int64_t rest = idx / kCPR;
  const int i = static_cast<int>(rest % p.seqlen_new);
  rest /= p.seqlen_new;
  const int hk = static_cast<int>(rest % p.heads_kv);
  const int b = static_cast<int>(rest / p.heads_kv);
  const SeqInfo seq(b, p.seqlen_q, 0);  // the cache is paged by block_table; q, o, new tokens per sequence
  const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + i;
  if (pos < 0 || pos >= static_cast<int64_t>(p.max_pages) * p.page_size) return;  // clamped: never written outside
  int row;
  const int page = kvcache_page(p, b, static_cast<int>(pos), row);
  if (page < 0) return;
  const T* k_src = seq.q_side(static_cast<const T*>(p.k_new), p.kn_batch_stride, p.kn_head_stride,
                              p.kn_row_stride, hk);
  const T* v_src = seq.q_side(static_cast<const T*>(p.v_new), p.vn_batch_stride, p.vn_head_stride,
                              p.vn_row_stride, hk);
  const uint4 kv = *reinterpret_cast<const uint4*>(k_src + i * p.kn_row_stride + c);
  const uint4 vv = *reinterpret_cast<const uint4*>(v_src + i * p.vn_row_stride + c);
  *reinterpret_cast<uint4*>(static_cast<T*>(p.k_cache) + page * p.k_page_stride + row * p.k_row_stride +
                            hk * p.k_head_stride + c) = kv;
  *reinterpret_cast<uint4*>(static_cast<T*>(p.v_cache) + page * p.v_page_stride + row * p.v_row_stride +
                            hk * p.v_head_stride + c) = vv;
}

}  // namespace fae
