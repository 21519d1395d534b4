// Attention against a KV cache: decode (one new token) and chunked prefill (a few), paged or contiguous cache,
// split-KV. Three kernels, launched in this order on one stream (decode_launch.cuh):
//
//   kvcache_append_kernel  copies k_new / v_new into the cache at positions cache_seqlens[b] + i (only when new
//                          tokens are given). A separate launch, so every attention block sees them written.
//   decode_split_kernel    one block per (split, batch, kv head, block of 16 packed query rows). GQA packing: the
//                          block's rows are the (query row, head) pairs of ALL Hq/Hkv query heads of its kv head,
//                          so each K/V row is loaded once for the whole group. The block walks its split's chunk
//                          of the keys in tiles of kWarps * 16 keys fetched through the block table (16-byte
//                          cp.async gathers, or one bulk copy per row: DecodeTraits) into a kStages-deep
//                          shared-memory ring; the block table entries of a tile are read one tile ahead of
//                          its copies, so their latency never stalls the copy issue (page size 1 reads one
//                          entry per key); warp w takes keys [16w, 16w + 16) of each tile, computes
//                          S = Q K^T and O += P V with mma.sync m16n8k16 and keeps its own SoftmaxState per row.
//                          At the end the warps' states are merged with SoftmaxState::merge (fixed order),
//                          then written as the final (o, lse) when num_splits == 1, else as an fp32 partial.
//                          decode_heads_kernel (heads_kernel.cuh) is the same work with 4 kv heads per block and
//                          one copy per key row of all 4: the default on the paged cache (decode_plan).
//   decode_combine_kernel  merges the num_splits partials of each row (the total state with SoftmaxState::merge in
//                          a fixed order, then the weighted sum in split order: deterministic), writes o in q's
//                          dtype and lse. Launched as a programmatic dependent of the split kernel on sm_90.
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
#include "../../sm80/epilogue.h"
#include "../../sm80/ptx.h"
#include "../../sm80/smem_tile.h"
#include "../../sm80/warp_gemm.h"

namespace fae {

// The split kernel's shape and its speed knobs (all compile-time; decode_launch.cuh lists the variants built):
//   kWarps   warps per block; each warp takes 16 keys of a tile, so a tile is kWarps * 16 keys.
//   kStages  tiles in the shared-memory ring (kStages - 1 in flight while one is computed).
//   kBulk    false: each thread gathers 16-byte chunks with cp.async (any arch >= sm_80).
//            true:  each thread copies one whole K or V row (kHeadDim * 2 bytes) with a 1-D bulk copy
//                   (cp.async.bulk, sm_90) completing on the stage's mbarrier: one instruction per row instead
//                   of kHeadDim / 8, and the bytes in flight are tracked by the copy engine, not the LSU.
//   kPrefetch  tiles beyond the ring whose rows are prefetched into L2 only (no shared memory): more bytes in
//              flight per SM than the ring holds, and the ring's own copies then hit L2. 0: none.
template <typename T_, int kHeadDim_, int kWarps_ = 4, int kStages_ = 3, bool kBulk_ = false, int kPrefetch_ = 0>
struct DecodeTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16;               // packed query rows per block: one mma m-tile
  static constexpr int kWarpN = 16;                // keys per warp per tile
  static constexpr int kBlockN = kWarps * kWarpN;  // keys per tile
  static constexpr int kStages = kStages_;
  static constexpr bool kBulk = kBulk_;
  static constexpr int kPrefetch = kPrefetch_;
  static constexpr int kHeadsPerBlock = 1;  // one kv head per block (heads_kernel.cuh: several)
  static constexpr int kDTiles = kHeadDim / 8;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks per row
  // cp.async: thread tid copies chunk tid % kChunksPerRow of kRowsPerThread rows, kRowStep apart, of K and V.
  // bulk: thread tid copies row tid % kBlockN of K (tid < kBlockN) or V (kThreads == 2 * kBlockN).
  static constexpr int kRowStep = kBulk ? kBlockN : kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kBulk ? 1 : kBlockN / kRowStep;
  static constexpr int kRowBytes = kHeadDim * 2;
  // Epilogue: each warp's unnormalised O (fp32) and (m, l) per row, staged over the K/V ring.
  static constexpr int kOPitch = kHeadDim + 8;
  static constexpr int kEpilogueBytes = kWarps * kBlockM * kOPitch * 4 + 2 * kWarps * kBlockM * 4;
  static constexpr int kRingBytes = 2 * kStages * KVTile::kBytes;
  // Shared memory: [one mbarrier per stage (bulk only), padded to 16 bytes][Q tile][K/V ring | epilogue].
  static constexpr int kBarBytes = kBulk ? (kStages * 8 + 15) / 16 * 16 : 0;
  static constexpr int kSmemBytes =
      kBarBytes + QTile::kBytes + (kRingBytes > kEpilogueBytes ? kRingBytes : kEpilogueBytes);
  static_assert(kHeadDim % 16 == 0 && kThreads % kChunksPerRow == 0 && kBlockN % kRowStep == 0, "tile shape");
  static_assert(kThreads == 2 * kBlockN, "bulk copies and L2 prefetches: one K or V row per thread");
  static_assert(kStages >= 2, "the ring needs a stage in flight while one is computed");
  static_assert(QTile::kBytes % 16 == 0, "epilogue staging must stay 16-byte aligned");
};

// A split-kernel block's key tiles (tile_keys keys each): the tiles holding keys [key_begin, key_end) cut into
// num_splits near-equal contiguous pieces; piece `split` as [x, y) (empty where the split is past the keys).
__device__ __forceinline__ int2 split_tile_range(int key_begin, int key_end, int tile_keys, int split,
                                                 int num_splits) {
  const int tile_lo = key_begin / tile_keys;
  const int tile_hi = key_end > key_begin ? (key_end + tile_keys - 1) / tile_keys : tile_lo;
  const int per_split = (tile_hi - tile_lo + num_splits - 1) / num_splits;
  const int begin = min(tile_lo + split * per_split, tile_hi);
  return make_int2(begin, min(begin + per_split, tile_hi));
}

// The key position of query row i of batch b: KvCacheParams::q_pos where given, else bottom-right aligned (and
// for the padding rows past seqlen_q of a block's last rows, which are never written). A given position is
// clamped to +-2^30 so the window arithmetic on it (p - left, p + right + 1) cannot overflow an int.
__device__ __forceinline__ int kvcache_row_pos(const KvCacheParams& p, const WindowMask& mask, int b, int i) {
  if (p.q_pos == nullptr || i >= p.seqlen_q) return mask.pos(i);
  constexpr int kLimit = 1 << 30;
  return min(max(__ldg(p.q_pos + static_cast<int64_t>(b) * p.seqlen_q + i), -kLimit), kLimit);
}

// The smallest and largest key position of query rows [i_lo, i_end) of batch b (a block's rows: they set its
// key range and its no-mask test). Explicit positions need not be ordered: a block has at most 16 rows to scan.
__device__ __forceinline__ int2 kvcache_pos_range(const KvCacheParams& p, const WindowMask& mask, int b, int i_lo,
                                                  int i_end) {
  if (p.q_pos == nullptr) return make_int2(mask.pos(i_lo), mask.pos(i_end - 1));
  int lo = 0x7fffffff, hi = -0x7fffffff - 1;
  for (int i = i_lo; i < i_end; ++i) {
    const int v = kvcache_row_pos(p, mask, b, i);
    lo = min(lo, v);
    hi = max(hi, v);
  }
  return make_int2(lo, hi);
}

// One warp's step over 16 keys of a ring tile, in both split kernels: S = Q K^T for its 16 packed rows (Q as the
// A fragments of the k16 steps, in registers), the mask, the online softmax in the log2 domain (as the FA2
// forward; each thread sums only its own columns into l, the quad is summed in the epilogue) and O += P V. K and
// V are rows [row0, row0 + 16) of Tile at sK / sV; c0 is the position of the first of those keys. qpos: the key
// positions of this thread's rows (g, g + 8); pos_range: the smallest and largest over the block's rows.
template <typename T, typename Tile, int kDT, int kKSteps>
__device__ __forceinline__ void decode_key16_step(float (&acc_o)[kDT][4], SoftmaxState (&state)[2],
                                                  const uint32_t (&qa)[1][kKSteps][4], uint32_t sK, uint32_t sV,
                                                  int row0, int c0, const WindowMask& mask, int2 pos_range,
                                                  const int (&qpos)[2], float scale_log2, int lane) {
  const int t = lane % 4;
  float acc_s[2][4];  // key tiles 0 and 1 of the 16 keys
  zero_acc(acc_s);
  gemm_rbt<T, Tile>(one_mtile(acc_s), qa, sK, row0, lane);
  if (!mask.tile_fully_visible_at(pos_range.x, pos_range.y, c0, c0 + 16)) {
#pragma unroll
    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!mask.visible_at(qpos[e >> 1], c0 + ni * 8 + 2 * t + (e & 1))) acc_s[ni][e] = -INFINITY;
  }
  float factor[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = fmaxf(fmaxf(acc_s[0][2 * half], acc_s[0][2 * half + 1]),
                     fmaxf(acc_s[1][2 * half], acc_s[1][2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    SoftmaxState& st = state[half];
    factor[half] = st.rescale_to(mx * scale_log2);
    const float offset = st.exp_offset();
    float sum = 0.f;
#pragma unroll
    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        const float pe = exp2_approx(fmaf(acc_s[ni][e], scale_log2, -offset));
        acc_s[ni][e] = pe;
        sum += pe;
      }
    st.l += sum;
  }
#pragma unroll
  for (int di = 0; di < kDT; ++di)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[di][e] *= factor[e >> 1];
  // The S accumulators of the two key tiles are the A operand of one k16 step of P V.
  uint32_t pf[1][1][4];
  pack_a_frags<T>(pf, one_mtile(acc_s));
  gemm_rb<T, Tile>(one_mtile(acc_o), pf, sV, row0, 0, lane);
}

// pos -> (logical page, row in page) without an integer division when the page size is a power of two (every
// common size) or the cache is contiguous (one page per sequence): a shift and a mask, uniform over the block.
struct PageSplitter {
  int size, shift, mask;  // shift < 0: a paged cache whose page size is not a power of two: divide
  __device__ __forceinline__ PageSplitter(int page_size, bool contiguous) : size(page_size) {
    if (contiguous) {  // 0 <= pos < 2^31: page 0, row pos
      shift = 31;
      mask = 0x7fffffff;
    } else {
      shift = (page_size & (page_size - 1)) == 0 ? __ffs(page_size) - 1 : -1;
      mask = page_size - 1;
    }
  }
  __device__ __forceinline__ int page_of(int pos) const { return shift >= 0 ? pos >> shift : pos / size; }
  __device__ __forceinline__ int row_of(int pos, int lp) const { return shift >= 0 ? pos & mask : pos - lp * size; }
};

// Asks L2 to fetch `bytes` (a multiple of 16, 16-byte aligned) from global memory; nothing comes back to the
// SM. sm_90: one bulk prefetch; older: one prefetch per 128-byte line.
__device__ __forceinline__ void l2_prefetch(const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
#else
  for (int off = 0; off < bytes; off += 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(src) + off));
#endif
}

// Keys seen by batch b: cache_seqlens[b] + seqlen_new, clamped to [0, capacity] so a bad length can never send
// a load or store outside the cache.
__device__ __forceinline__ int kvcache_seqlen_k(const KvCacheParams& p, int b) {
  const int64_t capacity = static_cast<int64_t>(p.max_pages) * p.page_size;
  int64_t len = static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlen_new;
  len = len < 0 ? 0 : (len > capacity ? capacity : len);
  return static_cast<int>(len);
}

// Physical page of logical page lp of batch b (0 <= lp < max_pages), or -1 when the block table entry is out of
// range; for a contiguous cache, batch b's own "page".
__device__ __forceinline__ int kvcache_physical_page(const KvCacheParams& p, int b, int lp) {
  if (p.block_table == nullptr) return b;
  const int page = __ldg(p.block_table + b * p.block_table_stride + lp);
  return (page >= 0 && page < p.num_pages) ? page : -1;
}

// Physical page of key position pos (0 <= pos < capacity) of batch b, or -1 when the block table entry is out
// of range. row receives pos % page_size.
__device__ __forceinline__ int kvcache_page(const KvCacheParams& p, int b, int pos, int& row) {
  const int lp = pos / p.page_size;
  row = pos - lp * p.page_size;
  return kvcache_physical_page(p, b, lp);
}

}  // namespace fae
