// Host-side launch of the KV-cache attention kernels (append_kernel.cuh, split_kv_kernel.cuh, combine_kernel.cuh)
// for one (dtype, head dim): the append kernel when new tokens are given, then the split kernel, then the combine
// kernel when num_splits > 1, all on
// `stream` and none reading anything on the host (CUDA-graph capturable).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "../launch.h"
#include "append_kernel.cuh"
#include "combine_kernel.cuh"
#include "split_kv_kernel.cuh"

namespace fae {

template <typename Tr>
void decode_set_smem_attr() {
  // Once per kernel (not per launch, unlike set_smem_limit): the first graph-captured decode step must not
  // make device queries inside the capture.
  static const bool done = (set_smem_limit(decode_split_kernel<Tr>, Tr::kSmemBytes, "decode_split"), true);
  (void)done;
}

// Resident split-kernel blocks per SM, for the host's num_splits heuristic (a host-side query: no sync).
// Queried once per process (the first call, normally before any graph capture), like the smem attribute.
template <typename T, int kHeadDim>
int decode_blocks_per_sm() {
  using Tr = DecodeTraits<T, kHeadDim>;
  static const int blocks = [] {
    decode_set_smem_attr<Tr>();
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_kernel<Tr>, Tr::kThreads,
                                                                    Tr::kSmemBytes),
                      "cudaOccupancyMaxActiveBlocksPerMultiprocessor(decode_split)");
    return n > 0 ? n : 1;
  }();
  return blocks;
}

template <typename T, int kHeadDim>
void run_kvcache_fwd(const KvCacheParams& p, cudaStream_t stream) {
  using Tr = DecodeTraits<T, kHeadDim>;
  if (p.k_new != nullptr && p.seqlen_new > 0) {
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_kv * p.seqlen_new * (kHeadDim / 8);
    const int64_t blocks = (chunks + 255) / 256;
    if (blocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: k_new too large for one grid");
    if (blocks > 0) {
      kvcache_append_kernel<T, kHeadDim><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
      check_cuda(cudaGetLastError(), "kvcache_append launch");
    }
  }
  const int64_t blocks = static_cast<int64_t>(p.num_splits) * p.num_m_blocks * p.batch * p.heads_kv;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff)
    throw std::runtime_error("flashattn_ext: num_splits * batch * kv heads * query blocks exceeds the CUDA grid limit");
  decode_set_smem_attr<Tr>();
  decode_split_kernel<Tr><<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "decode_split launch");
  if (p.num_splits > 1) {
    constexpr int kRowsPerBlock = 128 / (kHeadDim / 4);
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    const int64_t cblocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    if (cblocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: too many rows for the combine grid");
    decode_combine_kernel<T, kHeadDim><<<static_cast<unsigned>(cblocks), 128, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "decode_combine launch");
  }
}

}  // namespace fae
