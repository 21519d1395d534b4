// Host-side launch of the KV-cache attention kernels (append_kernel.cuh, split_kv_kernel.cuh, combine_kernel.cuh)
// for one (dtype, head dim): the append kernel when new tokens are given, then the split kernel, then the combine
// kernel when num_splits > 1, all on `stream` and none reading anything on the host (CUDA-graph capturable).
#pragma once
#include <cuda_runtime.h>
#include "../launch.h"
#include "append_kernel.cuh"
#include "combine_kernel.cuh"
#include "split_kv_kernel.cuh"

namespace fae {

// Resident split-kernel blocks per SM, for the host's num_splits heuristic (a host-side query: no sync).
// Queried once per process (the first call, normally before any graph capture), like the smem attribute.
template <typename T, int kHeadDim>
int decode_blocks_per_sm() {
  using Tr = DecodeTraits<T, kHeadDim>;
  static const int blocks = [] {
    set_smem_limit_once<decode_split_kernel<Tr>>(Tr::kSmemBytes, "decode_split");
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
    launch<kvcache_append_kernel<T, kHeadDim>>((chunks + 255) / 256, 256, 0, p, stream, "kvcache_append");
  }
  const int64_t blocks = static_cast<int64_t>(p.num_splits) * p.num_m_blocks * p.batch * p.heads_kv;
  launch<decode_split_kernel<Tr>>(blocks, Tr::kThreads, Tr::kSmemBytes, p, stream, "decode_split");
  if (blocks > 0 && p.num_splits > 1) {
    constexpr int kRowsPerBlock = 128 / (kHeadDim / 4);
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    launch<decode_combine_kernel<T, kHeadDim>>((rows + kRowsPerBlock - 1) / kRowsPerBlock, 128, 0, p, stream,
                                               "decode_combine");
  }
}

}  // namespace fae
