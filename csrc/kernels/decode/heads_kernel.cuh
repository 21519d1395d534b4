// decode_heads_kernel: the split kernel's work (decode_common.cuh) with several kv heads per block, so each copy
// moves a whole row of the block's heads instead of one head's 256 bytes (sm_90 only: bulk copies).
//
// Why (H200, ncu of bulk_4w3s at 64 x 4096, bench/NOTES.md): the per-head kernel issues one 1-D bulk copy per K/V
// row and head; a bulk copy takes uniform operands, so every warp serialises its 32 lanes' copies through an
// ELECT / R2UR loop, and that loop was 44% of the warps' stall samples, against 0.1% waiting for data: the SMs,
// not DRAM (77-84% of peak), set the pace. In the paged cache (pages, page_size, Hkv, D) the heads of one key
// are adjacent, so a block of kHeads heads copies one (kHeads * D * 2)-byte row per key and K/V: 8x fewer copies
// for 4 heads at D128, and one block-table read per key for all of them.
//
// Block: kHeads warps; warp w owns kv head hk0 + w and its 16 packed (query row, group head) rows of the block's
// m-tile, over the split's keys in tiles of 16. No cross-warp merge: each warp writes its own rows. Shared
// memory: a kStages ring of (K, V) tiles laid out [key][head][D], key rows padded by 16 bytes so ldmatrix's 8 row
// addresses fall in 8 bank groups; Q goes straight from global memory into the warp's A fragments.
#pragma once
#include "decode_common.cuh"
#include "../../sm90/ptx.h"
#include "../../sm90/ptx_bwd.h"

namespace fae {

template <typename T_, int kHeadDim_, int kHeads_, int kStages_>
struct DecodeHeadsTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadsPerBlock = kHeads_;
  static constexpr int kWarps = kHeads_;  // one warp per kv head
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = kStages_;
  static constexpr int kBlockM = 16;  // packed rows per warp: one mma m-tile
  static constexpr int kBlockN = 16;  // keys per tile: one k16 step of P V (decode_key16_step)
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kKeyPitchBytes = kHeads_ * kHeadDim * 2 + 16;
  static constexpr int kKVBytes = kBlockN * kKeyPitchBytes;  // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kKVBytes;
  static constexpr int kBarBytes = (kStages * 8 + 15) / 16 * 16;
  static constexpr int kSmemBytes = kBarBytes + kStages * kStageBytes;
  // At most one copy per thread and tile: 2 * kBlockN keys x (1 row of all heads, or kHeads rows of one head).
  static_assert(kThreads >= 2 * kBlockN * kHeads_, "one copy per thread");
  static_assert(kHeadDim % 16 == 0 && kStages >= 2, "tile shape");
};

// One head's rows of a [key][head][D] ring tile, as the warp GEMMs address tiles (warp_gemm.h).
template <typename Tr>
struct HeadSlice {
  static constexpr int kPitchBytes = Tr::kKeyPitchBytes;
  __device__ __forceinline__ static uint32_t addr(uint32_t s, int r, int c) { return s + r * kPitchBytes + c * 2; }
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads) decode_heads_kernel(const __grid_constant__ KvCacheParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kBlockN = Tr::kBlockN, kDT = Tr::kDTiles, kStages = Tr::kStages;
  constexpr int kHeads = Tr::kHeadsPerBlock, kWarps = Tr::kWarps;
  using Slice = HeadSlice<Tr>;

  extern __shared__ __align__(16) char smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // one mbarrier per ring stage
  const uint32_t sBase = smem_addr(smem);
  const uint32_t sRing = sBase + Tr::kBarBytes;  // stage s: K at sRing + s * kStageBytes, V kKVBytes after it

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel (see split_kv_kernel.cuh)

  // Flat grid: split fastest, then m-block, then (batch, group of kHeads kv heads).
  const int split = blockIdx.x % p.num_splits;
  const int rest = blockIdx.x / p.num_splits;
  const int m_block = rest % p.num_m_blocks;
  const int bh = rest / p.num_m_blocks;
  const int head_blocks = p.heads_kv / kHeads;
  const int b = bh / head_blocks, hk0 = (bh % head_blocks) * kHeads, hk = hk0 + warp;
  const SeqInfo seq(b, p.seqlen_q, 0);
  const int group = p.head_group;
  const int rows = p.seqlen_q * group;
  const int mr0 = m_block * Tr::kBlockM;
  const int mr_end = min(mr0 + Tr::kBlockM, rows);

  const int seqlen_k = kvcache_seqlen_k(p, b);
  const WindowMask mask{p.seqlen_q, seqlen_k, p.window_left, p.window_right};
  const int i_lo = mr0 / group, i_end = (mr_end - 1) / group + 1;
  const int2 pos_range = kvcache_pos_range(p, mask, b, i_lo, i_end);
  const int2 tiles = split_tile_range(mask.key_begin_at(pos_range.x), mask.key_end_at(pos_range.y), kBlockN, split,
                                      p.num_splits);
  const int tile_begin = tiles.x, tile_end = tiles.y, n_tiles = tile_end - tile_begin;
  const PageSplitter pages(p.page_size, p.block_table == nullptr);

  // This thread's copy of every tile: (K or V, key, head unit). When the block's heads are adjacent in memory
  // (head stride D, the paged layout), one copy per key moves all of them; otherwise one copy per head. Copy ci
  // goes to thread lane * kWarps + warp, so a few copies spread over the warps instead of queueing in one.
  const bool heads_adjacent = p.k_head_stride == kD && p.v_head_stride == kD;
  const int units = heads_adjacent ? 1 : kHeads;
  const int n_copies = 2 * kBlockN * units;
  const int ci = lane * kWarps + warp;
  const bool copier = ci < n_copies;
  const int c_kv = ci / (kBlockN * units), c_key = (ci % (kBlockN * units)) / units, c_unit = ci % units;
  const uint32_t c_bytes = (heads_adjacent ? kHeads : 1) * kD * 2;
  const int c_head = hk0 + c_unit;
  const T* c_base = static_cast<const T*>(c_kv ? p.v_cache : p.k_cache) +
                    static_cast<int64_t>(c_head) * (c_kv ? p.v_head_stride : p.k_head_stride);
  const int64_t c_page_stride = c_kv ? p.v_page_stride : p.k_page_stride;
  const int64_t c_row_stride = c_kv ? p.v_row_stride : p.k_row_stride;
  const uint32_t c_dst_off = c_kv * Tr::kKVBytes + c_key * Tr::kKeyPitchBytes + c_unit * kD * 2;

  // The raw block-table entry of this thread's key of `tile` (-2: no copy: past the split or the keys). It is
  // read a tile before its copy and checked only there, so its latency is spent under a tile's math.
  auto fetch_entry = [&](int tile) {
    const int pos = tile * kBlockN + c_key;
    if (!copier || tile >= tile_end || pos >= seqlen_k) return -2;
    if (p.block_table == nullptr) return b;
    return __ldg(p.block_table + b * p.block_table_stride + pages.page_of(pos));
  };
  auto load_tile = [&](int stage, int tile, int entry) {
    if (!copier || tile >= tile_end) return;
    uint64_t* bar = bars + stage;
    const uint32_t dst = sRing + stage * Tr::kStageBytes + c_dst_off;
    const bool valid = entry >= 0 && (p.block_table == nullptr || entry < p.num_pages);
    if (valid) {
      const int pos = tile * kBlockN + c_key;
      const T* src = c_base + entry * c_page_stride + pages.row_of(pos, pages.page_of(pos)) * c_row_stride;
      sm90::mbar_arrive_expect_tx(bar, c_bytes);
      sm90::bulk_load(smem + (dst - sBase), src, c_bytes, bar);
    } else {
      // Past the keys or a bad table entry: zeros (P = 0 times a NaN left in the ring would still be NaN); the
      // fence orders these generic stores before later bulk copies into the same bytes.
      for (uint32_t off = 0; off < c_bytes; off += 16)
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(dst + off), "r"(0) : "memory");
      sm90::fence_proxy_async_smem();
      sm90::mbar_arrive(bar);
    }
  };

  // Query row of packed rows g and g + 8 of this warp's m-tile (past the end for padding rows, never written).
  const int qi[2] = {(mr0 + g) / group, (mr0 + g + 8) / group};
  const int qpos[2] = {kvcache_row_pos(p, mask, b, qi[0]), kvcache_row_pos(p, mask, b, qi[1])};
  float acc_o[kDT][4];
  zero_acc(acc_o);
  SoftmaxState state[2];
  state[0].init();
  state[1].init();
  // A block with no keys (an empty split or row range) skips to the epilogue: its rows are 0 / lse -inf, which
  // the combine kernel reads like any other split's partial.
  if (n_tiles > 0) {
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) sm90::mbar_init(bars + s, n_copies);
      sm90::mbar_fence_init();
    }
    __syncthreads();
    {
      int first[kStages];
#pragma unroll
      for (int s = 0; s < kStages; ++s) first[s] = fetch_entry(tile_begin + s);
#pragma unroll
      for (int s = 0; s < kStages; ++s) load_tile(s, tile_begin + s, first[s]);
    }
    int entry_next = fetch_entry(tile_begin + kStages);

    // Q rows g and g + 8 of this warp's m-tile, straight into the A fragments of the k16 steps of S = Q K^T
    // (under the ring's first copies).
    uint32_t qa[1][kD / 16][4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mr0 + g + 8 * half;
      const bool valid = r < rows;
      const T* src = valid ? seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride,
                                        p.q_row_stride, hk * group + r % group) + qi[half] * p.q_row_stride + 2 * t
                           : nullptr;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        qa[0][kk][half] = valid ? __ldg(reinterpret_cast<const uint32_t*>(src + kk * 16)) : 0u;
        qa[0][kk][2 + half] = valid ? __ldg(reinterpret_cast<const uint32_t*>(src + kk * 16 + 8)) : 0u;
      }
    }

    int stage = 0;
    for (int j = 0; j < n_tiles; ++j, stage = stage + 1 == kStages ? 0 : stage + 1) {
      const int tile = tile_begin + j;
      sm90::mbar_wait(bars + stage, (j / kStages) & 1);
      const uint32_t sK = sRing + stage * Tr::kStageBytes + warp * kD * 2, sV = sK + Tr::kKVBytes;
      decode_key16_step<T, Slice>(acc_o, state, qa, sK, sV, 0, tile * kBlockN, mask, pos_range, qpos,
                                  p.scale_log2, lane);
      // Every warp is done with this stage: refill it with tile j + kStages, then read the entry after that.
      __syncthreads();
      load_tile(stage, tile + kStages, entry_next);
      entry_next = fetch_entry(tile + kStages + 1);
    }
  }  // n_tiles > 0

  // This warp's rows: the final output (one split) or an fp32 partial for the combine kernel.
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    SoftmaxState& st = state[half];
    st.l += __shfl_xor_sync(0xffffffff, st.l, 1);
    st.l += __shfl_xor_sync(0xffffffff, st.l, 2);
    const int r = mr0 + g + 8 * half;
    if (r >= rows) continue;
    const float inv = st.inv_sum();
    const int i = qi[half], h = hk * group + r % group;
    const int64_t out_row = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
    if (p.num_splits == 1) {
      T* o = seq.q_side(static_cast<T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, h) +
             i * p.o_row_stride + 2 * t;
#pragma unroll
      for (int di = 0; di < kDT; ++di)
        *reinterpret_cast<uint32_t*>(o + di * 8) =
            pack2<T>(acc_o[di][2 * half] * inv, acc_o[di][2 * half + 1] * inv);
      if (t == 0) p.lse[out_row] = st.lse();
    } else {
      const int64_t ws_row = split * total_rows + out_row;
      float* o = p.ws_o + ws_row * kD + 2 * t;
#pragma unroll
      for (int di = 0; di < kDT; ++di)
        *reinterpret_cast<float2*>(o + di * 8) = make_float2(acc_o[di][2 * half] * inv, acc_o[di][2 * half + 1] * inv);
      if (t == 0) p.ws_lse[ws_row] = st.lse();
    }
  }
#else
  __trap();  // launched only where compiled_for_sm90 (decode_launch.cuh)
#endif
}

}  // namespace fae
