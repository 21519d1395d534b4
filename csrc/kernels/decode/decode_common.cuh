// Attention against a KV cache: decode (one new token) and chunked prefill (a few), paged or contiguous cache,
// split-KV. Three kernels, launched in this order on one stream (decode_launch.cuh):
//
//   kvcache_append_kernel  copies k_new / v_new into the cache at positions cache_seqlens[b] + i (only when new
//                          tokens are given). A separate launch, so every attention block sees them written.
//   decode_split_kernel    one block per (split, batch, kv head, block of 16 packed query rows). GQA packing: the
//                          block's rows are the (query row, head) pairs of ALL Hq/Hkv query heads of its kv head,
//                          so each K/V row is loaded once for the whole group. The block walks its split's chunk
//                          of the keys in 64-key tiles fetched through the block table with 16-byte cp.async into
//                          a 3-stage shared-memory ring; warp w takes keys [16w, 16w + 16) of each tile, computes
//                          S = Q K^T and O += P V with mma.sync m16n8k16 and keeps its own SoftmaxState per row.
//                          At the end the four warps' states are merged with SoftmaxState::merge (fixed order),
//                          then written as the final (o, lse) when num_splits == 1, else as an fp32 partial.
//   decode_combine_kernel  merges the num_splits partials of each row in split order (SoftmaxState::merge:
//                          deterministic), writes o in q's dtype and lse.
//
// The number of keys of batch b, cache_seqlens[b] + seqlen_new, is read on the device: no host sync, so a
// decode step can be captured in a CUDA graph and replayed with new lengths. Every value is clamped here, so no
// length or block table entry can fault or write outside the cache: lengths to [0, capacity], and positions whose
// page entry is out of range are zero-filled and masked (never read) or, when appending, skipped.
#pragma once
#include <cuda_runtime.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../common/seqlen.h"
#include "../../common/softmax.h"
#include "../../sm80/ptx.h"
#include "../../sm80/smem_tile.h"

namespace fae {

template <typename T_, int kHeadDim_>
struct DecodeTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16;               // packed query rows per block: one mma m-tile
  static constexpr int kWarpN = 16;                // keys per warp per tile
  static constexpr int kBlockN = kWarps * kWarpN;  // keys per tile
  static constexpr int kStages = 3;                // tiles in the shared-memory ring (2 in flight while computing)
  static constexpr int kDTiles = kHeadDim / 8;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kBlockN / kRowStep;  // K/V rows each thread copies per tile
  // Epilogue: each warp's unnormalised O (fp32) and (m, l) per row, staged over the K/V ring.
  static constexpr int kOPitch = kHeadDim + 8;
  static constexpr int kEpilogueBytes = kWarps * kBlockM * kOPitch * 4 + 2 * kWarps * kBlockM * 4;
  static constexpr int kRingBytes = 2 * kStages * KVTile::kBytes;
  static constexpr int kSmemBytes = QTile::kBytes + (kRingBytes > kEpilogueBytes ? kRingBytes : kEpilogueBytes);
  static_assert(kHeadDim % 16 == 0 && kThreads % kChunksPerRow == 0 && kBlockN % kRowStep == 0, "tile shape");
  static_assert(QTile::kBytes % 16 == 0, "epilogue staging must stay 16-byte aligned");
};

// Keys seen by batch b: cache_seqlens[b] + seqlen_new, clamped to [0, capacity] so a bad length can never send
// a load or store outside the cache.
__device__ __forceinline__ int kvcache_seqlen_k(const KvCacheParams& p, int b) {
  const int64_t capacity = static_cast<int64_t>(p.max_pages) * p.page_size;
  int64_t len = static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlen_new;
  len = len < 0 ? 0 : (len > capacity ? capacity : len);
  return static_cast<int>(len);
}

// Physical page of key position pos (0 <= pos < capacity) of batch b, or -1 when the block table entry is out
// of range. row receives pos % page_size.
__device__ __forceinline__ int kvcache_page(const KvCacheParams& p, int b, int pos, int& row) {
  const int lp = pos / p.page_size;
  row = pos - lp * p.page_size;
  if (p.block_table == nullptr) return b;
  const int page = __ldg(p.block_table + b * p.block_table_stride + lp);
  return (page >= 0 && page < p.num_pages) ? page : -1;
}

}  // namespace fae
