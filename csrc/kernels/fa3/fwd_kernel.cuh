// Hopper (sm_90a) FlashAttention forward: TMA loads, wgmma, warp specialisation.
//
// One block per SM striding over the (query tile of 128 rows (D64 tall: 192), batch, head) tiles, heaviest
// first, or one block per tile (the launcher picks: fwd_launch.cuh), 3 warpgroups (D64 tall: 4). Varlen
// (kVarlen, packed sequences): the tiles are counted by the longest sequence; a tile past its own sequence's end
// loads and stores nothing (fa3/seq.cuh).
//   warpgroup 0 (producer): one thread issues TMA copies of Q tiles into kQBuffers buffers and of K/V tiles
//     into a ring of kStages shared-memory stages, running ahead across tile boundaries; "full" mbarriers
//     complete when the bytes land, "free" ones when both consumers are done with a buffer or a stage's K or V.
//     It gives most of its registers away (setmaxnreg).
//   warpgroups 1, 2 (D64 tall: 1-3) (consumers): 64 query rows each. S = Q K^T with both operands in shared
//     memory, online softmax in registers (base 2, scale * log2(e) folded in), O += P V with P straight from
//     the S accumulators (registers) and V read transposed from shared memory; S(i) is issued with PV(i-1) and
//     the consumers take turns issuing (ping-pong). Across tiles the same: the next tile's first S is issued
//     with this tile's last PV (two Q buffers). O is normalised and staged in the tile's Q buffer, then stored
//     with 16-byte coalesced copies (D256, one Q buffer: straight from the accumulators).
// kGlobal (op fwd_global, Longformer global tokens): after a query tile's window tiles come the tiles of the
//   batch's gathered global K/V, masked to the global keys each row's window leaves out.
// The FAE_FA3_* macros are tuning experiments (bench/probe_batch.sh); the defaults are the measured best.
// Shared-memory tiles are stored as the TMA writes them with the 128-byte swizzle: each 64-column panel of a
// tile is rows x 128 bytes, 8-row atoms of 1024 bytes; the wgmma descriptors below address that layout.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../sm80/ptx.h"
#include "../../sm90/ptx.h"
#include "../../sm90/wgmma_ops.h"
#include "seq.cuh"

namespace fae {

// kTall (D64 only): three consumers (192-row tiles) with 96-key tiles, as FA3 does; the K/V bytes per key row are
// half of D128's, so two consumers over 128 rows leave the tensor cores waiting on the softmax (measured
// +6-15% at S4k-16k). The narrower key tiles are what fits three accumulator sets in 160 registers without
// spills. Short sequences keep 128-row tiles: 1024 rows in 192-row tiles waste a third of the last one
// (measured -3% / -5% causal at S1k). The launcher picks (fwd_launch.cuh).
template <typename T_, int kHeadDim_, bool kTall_ = false>
struct Fa3FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kTall = kTall_;
  static_assert(!kTall || kHeadDim == 64, "tall tiles are a D64 configuration");
  static constexpr int kConsumers = kTall ? 3 : 2;   // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kConsumers;
  // (kBlockN 176 and 3 K/V stages at D128 were measured, bench/NOTES.md; neither fits next to two Q buffers.)
  static constexpr int kBlockN = kTall ? 96 : kHeadDim <= 128 ? 128 : 64;
  static constexpr int kStages = kHeadDim <= 64 ? 4 : 2;
  // K and V stages of the ring (kStages each). Experiment (compiled, not yet run; bench/NOTES.md): one more K stage
  // at D128, where a third K/V pair does not fit next to two Q buffers but a third K does (224 KB): the next key
  // step's K, which S needs a step before PV needs its V, then lands earlier (ncu, D128 S1k: consumers waited for K
  // at 1.8% of samples in the key loop and 1.1% at the tile boundary).
#ifdef FAE_FA3_K_STAGES_D128
  static constexpr int kKStages = kHeadDim == 128 ? FAE_FA3_K_STAGES_D128 : kStages;
#else
  static constexpr int kKStages = kStages;
#endif
  static constexpr int kVStages = kStages;
  static constexpr int kPanels = kHeadDim / 64;     // 64-column (128-byte) swizzle panels per row
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kPanelQ = kBlockM * 128;     // bytes of one panel of the Q tile
  static constexpr int kPanelKV = kBlockN * 128;    // bytes of one panel of a K or V tile
  static constexpr int kQBytes = kPanelQ * kPanels;  // one Q buffer
  static constexpr int kKVBytes = kPanelKV * kPanels;
  // Two Q buffers where they fit (D <= 128): a block loads its next tile's Q while it works on this one, and a
  // finished tile's O is staged in its own Q buffer for 16-byte coalesced stores while the next tile runs.
  // D256 (one buffer): Q is released after the last S GEMM and O is stored straight from the accumulators.
  static constexpr int kQBuffers = kHeadDim <= 128 ? 2 : 1;
  static constexpr bool kStagedO = kQBuffers == 2;
  // Q buffers | K stages | V stages | mbarriers, after aligning the base to the 1024-byte swizzle atom.
  static constexpr int kBarrierOffset = kQBuffers * kQBytes + (kKStages + kVStages) * kKVBytes;
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (2 * kQBuffers + 2 * kKStages + 2 * kVStages) + 1024;
  // 64K registers per SM: 128 x 24 for the producer, the rest split among the consumers (multiple of 8).
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 2 ? 240 : 160;
  // Q as the register operand of S = Q K^T (read from shared memory once per tile, with ldmatrix) instead of a
  // second shared-memory operand on every k-step: halves the shared-memory reads of that GEMM. D256 keeps Q in
  // shared memory: its O accumulator alone takes 128 registers.
#ifdef FAE_FA3_Q_IN_REGS
  static constexpr bool kQInRegs = FAE_FA3_Q_IN_REGS && kHeadDim <= 128;
#else
  static constexpr bool kQInRegs = false;
#endif
#ifdef FAE_FA3_PINGPONG
  static constexpr bool kPingPong = FAE_FA3_PINGPONG;
#else
  static constexpr bool kPingPong = true;  // measured: +2-16% over issuing freely (bench/NOTES.md)
#endif
  // Experiment (compiled, not yet run; bench/NOTES.md): at a tile boundary, issue the next tile's second S GEMM
  // before this tile's epilogue, so the epilogue runs under it instead of with the tensor cores idle (ncu, D128
  // S1k: the boundary step costs 2.6x a key step), then that tile's first key step as a peeled step. Two Q
  // buffers, no global keys.
#ifdef FAE_FA3_EPI_UNDER_S
  static constexpr bool kEpilogueUnderS = FAE_FA3_EPI_UNDER_S && kQBuffers == 2;
#else
  static constexpr bool kEpilogueUnderS = false;
#endif
  static_assert(kHeadDim % 64 == 0, "the Hopper forward takes head dims that are multiples of 64");
  static_assert(kSmemBytes <= 227 * 1024, "tile does not fit in shared memory");
};

namespace fa3 {

// Accumulator fragment of wgmma m64nN (f32): per warp 16 rows; thread (g = lane/4, t = lane%4) holds, for
// each 8-column block j, d[4j + e] at (row g, col 8j + 2t + e) and d[4j + 2 + e] at (row g + 8, same col).
// The same indices give the A-operand fragment of the next wgmma (16 keys = blocks 2kk, 2kk + 1).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// The consumer's per-tile steps. Each issues or consumes wgmma work for one warpgroup (64 query rows).
template <typename Tr>
struct Consumer {
  using T = typename Tr::T;
  static constexpr int kBlockN = Tr::kBlockN, kD = Tr::kHeadDim;

  // S = Q K^T: D / 16 k-steps; a k-step is 32 bytes inside a 128-byte swizzle row of one panel. Issues only.
  static __device__ __forceinline__ void issue_qk(float (&acc_s)[kBlockN / 2], uint32_t q_base, uint32_t k_base) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;
      const uint64_t da = sm90::smem_desc_sw128(q_base + (kk / 4) * Tr::kPanelQ + off, 16, 1024);
      const uint64_t db = sm90::smem_desc_sw128(k_base + (kk / 4) * Tr::kPanelKV + off, 16, 1024);
      sm90::WgmmaSS<kBlockN, T, 0>::run(acc_s, da, db, kk > 0);
    }
  }

  // Same GEMM with Q in registers (q_frag: D / 16 k-steps of the A fragment).
  static __device__ __forceinline__ void issue_qk_rs(float (&acc_s)[kBlockN / 2], const uint32_t (&q_frag)[kD / 16][4],
                                                     uint32_t k_base) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint64_t db = sm90::smem_desc_sw128(k_base + (kk / 4) * Tr::kPanelKV + (kk % 4) * 32, 16, 1024);
      sm90::WgmmaRS<kBlockN, T, 0>::run(acc_s, q_frag[kk], db, kk > 0);
    }
  }

  // The A fragment of this warpgroup's 64 Q rows from the swizzled tile: ldmatrix.x4 per 16 x 16 block, lane l
  // addressing row l % 16 and 16-byte chunk 2 (kk % 4) + l / 16 of panel kk / 4; the 128-byte swizzle puts
  // chunk c of row r at chunk c ^ (r % 8).
  static __device__ __forceinline__ void load_q(uint32_t (&q_frag)[kD / 16][4], uint32_t q_base, int warp, int lane) {
    const int row = warp * 16 + lane % 16;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const int chunk = 2 * (kk % 4) + lane / 16;
      ldmatrix_x4(q_frag[kk], q_base + (kk / 4) * Tr::kPanelQ + row * 128 + ((chunk ^ (row % 8)) * 16));
    }
  }

  // O += P V: P (64 x kBlockN) from registers, V (kBlockN keys x D) MN-major in shared memory: a 16-key
  // k-step is 2 atoms of 8 key rows (sbo = 1024), the D columns span the panels (lbo = panel bytes). Issues only.
  // accumulate = false: O = P V (a tile's first step, O not zeroed beforehand).
  static __device__ __forceinline__ void issue_pv(float (&acc_o)[kD / 2], const uint32_t (&p_frag)[kBlockN / 16][4],
                                                  uint32_t v_base, bool accumulate = true) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint64_t dv = sm90::smem_desc_sw128(v_base + kk * 16 * 128, Tr::kPanelKV, 1024);
      sm90::WgmmaRS<kD, T, 1>::run(acc_o, p_frag[kk], dv, kk > 0 || accumulate);
    }
  }

  // Masks S where needed, folds its row maxima into the running state and turns S into unnormalised
  // probabilities in place; returns in scale_o the factors the O accumulator must be multiplied by.
  static __device__ __forceinline__ void softmax(float (&acc_s)[kBlockN / 2], float (&row_max)[2], float (&row_sum)[2],
                                                 float (&scale_o)[2], const WindowMask& mask, bool needs_mask,
                                                 int row0, int n0, int t, float scale_log2) {
    if (needs_mask) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + 8 * j + 2 * t + e;
          if (!mask.visible(row0, col)) acc_s[4 * j + e] = -INFINITY;
          if (!mask.visible(row0 + 8, col)) acc_s[4 * j + 2 + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(acc_s[4 * j + 2 * r], acc_s[4 * j + 2 * r + 1]));
      mx = quad_max(mx) * scale_log2;
      const float m_new = fmaxf(row_max[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet: exp2(-inf) = 0
      scale_o[r] = sm90::exp2_approx(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = sm90::exp2_approx(fmaf(acc_s[4 * j + 2 * r + e], scale_log2, -m_use));
          acc_s[4 * j + 2 * r + e] = pr;
          sum += pr;
        }
      row_sum[r] = row_sum[r] * scale_o[r] + sum;  // per-thread partial; reduced across the quad at the end
    }
  }

  // A global-key step (kGlobal): S masked to the gathered global keys these rows count on top of their window
  // (WindowMask::counts_global). `pos`: the key positions of the step's kBlockN gathered keys, the first `count`
  // of them real (the rest of the tile is the TMA's zero fill past the buffer). Then softmax without a mask.
  static __device__ __forceinline__ void mask_global(float (&acc_s)[kBlockN / 2], const WindowMask& mask,
                                                     const int* pos, int count, int row0, int t, bool causal) {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * j + 2 * t + e;
        const int g = c < count ? __ldg(pos + c) : -1;
        if (!mask.counts_global(row0, g, causal)) acc_s[4 * j + e] = -INFINITY;
        if (!mask.counts_global(row0 + 8, g, causal)) acc_s[4 * j + 2 + e] = -INFINITY;
      }
  }

  static __device__ __forceinline__ void rescale_o(float (&acc_o)[kD / 2], const float (&scale_o)[2]) {
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      acc_o[4 * j + 0] *= scale_o[0];
      acc_o[4 * j + 1] *= scale_o[0];
      acc_o[4 * j + 2] *= scale_o[1];
      acc_o[4 * j + 3] *= scale_o[1];
    }
  }

  // P as the A operand of the PV wgmma: 16 keys per k-step = 8-column blocks 2kk and 2kk + 1.
  static __device__ __forceinline__ void pack_p(uint32_t (&p_frag)[kBlockN / 16][4], const float (&acc_s)[kBlockN / 2]) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) p_frag[kk][r] = pack2<T>(acc_s[8 * kk + 2 * r], acc_s[8 * kk + 2 * r + 1]);
  }
};

}  // namespace fa3

namespace fa3 {
// The tile a block takes in round `round` of a persistent grid: position blockIdx.x of the round, counted
// backwards in odd rounds (a snake), so that over the heaviest-first numbering below each block's causal work
// sums to about the same (a plain stride gives block 0 the heaviest tile of every round). One block per tile
// (gridDim.x == tiles): round 0 only, tile = blockIdx.x.
__device__ __forceinline__ int persistent_tile(int round) {
  const int pos = (round & 1) ? static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  return round * static_cast<int>(gridDim.x) + pos;
}

// How the tiles are numbered: (batch, head) pairs are cut into chunks of `heads` pairs whose K/V fit in about
// half of the L2 (unmasked rows; see below); chunk by chunk, the query tiles are numbered last (for causal:
// heaviest) first, and inside a query-tile index, consecutive heads. So the tiles running at one time (about 132 consecutive numbers) are
// the few query tiles of a few heads whose K/V stay in L2 while all of them stream it, the query heads of a
// GQA group are neighbours, and a static stride still hands out the longest work first. (Numbered over all
// heads at once, short sequences with many heads ran K/V of ~132 heads at a time, far more than the L2: every
// query tile re-read its K/V from memory.)
struct TileOrder {
  int heads;  // (batch, head) pairs per chunk
  static constexpr int64_t kL2Budget = 24 << 20;  // bytes of K/V a chunk may keep in L2 (the H100/H200 L2: 50 MB)
  // one_block_per_tile: the grid is not persistent (the hardware hands out tiles in number order).
  __device__ __forceinline__ TileOrder(const FwdParams& p, int head_dim, int elt_bytes, bool one_block_per_tile) {
    const int64_t kv_bytes_per_head = 2ll * p.seqlen_k * head_dim * elt_bytes / p.head_group;  // K and V
    const int64_t fit = kL2Budget / (kv_bytes_per_head > 0 ? kv_bytes_per_head : 1);
    const int pairs = p.batch * p.heads_q;
    heads = fit < 1 ? 1 : fit > pairs ? pairs : static_cast<int>(fit);
    // Masked (causal / window) rows on a persistent grid: one chunk of every head, so the heaviest query tiles of
    // all heads come first; measured on the H200 (bench/NOTES.md): there, chunks give -9-11% at S4k causal (a
    // static stride over chunk after chunk balances the blocks' work worse), while unmasked rows gain 3-19%
    // (S16k..S1k). With one block per tile (long masked rows, fwd_launch.cuh) the hardware balances the
    // blocks, and chunks gave +8% at D128 S16k causal.
    if ((p.window_left >= 0 || p.window_right >= 0) && !one_block_per_tile) heads = pairs;
#if defined(FAE_FA3_L2_CHUNKS) && !FAE_FA3_L2_CHUNKS  // A/B experiment: one chunk of every head (the old order)
    heads = pairs;
#endif
  }
  // {query tile, batch * heads_q + head} of tile number `tile`.
  __device__ __forceinline__ int2 decode(const FwdParams& p, int tile, int num_m_blocks) const {
    const int pairs = p.batch * p.heads_q;
    const int chunk = tile / (num_m_blocks * heads), r = tile - chunk * num_m_blocks * heads;
    const int in_chunk = min(heads, pairs - chunk * heads);  // the last chunk may be smaller
    return make_int2(num_m_blocks - 1 - r / in_chunk, chunk * heads + r % in_chunk);
  }
};
}  // namespace fa3

// Which (query tile, batch, head) a block works on for a tile number (fa3::TileOrder), its sequence and mask,
// and the key tiles it visits: n_window tiles of its window, then (kGlobal) the tiles of the gathered global keys
// (FwdParams::global_*). A tile with any row has a window step (self-attention: every row sees its own key, the
// host checks Sq == Sk), so step 0, which the pipeline opens with the window's mask, is always a window step.
template <typename Tr, bool kVarlen, bool kGlobal = false>
struct Fa3Tile {
  int m_block, b, h, m0, m_end, n_end, n_count, n_window;
  SeqInfo seq;
  WindowMask mask;

  // padded_mask: the mask of every padded sequence (varlen tiles build their own).
  __device__ __forceinline__ Fa3Tile(const FwdParams& p, const WindowMask& padded_mask, const fa3::TileOrder& order,
                                     int tile, int num_m_blocks)
      : Fa3Tile(p, padded_mask, order.decode(p, tile, num_m_blocks)) {}
  // Key tile visited at step i of this tile: the last one first, so only the first steps can need a mask.
  __device__ __forceinline__ int n0(int i) const { return (n_end - 1 - i) * Tr::kBlockN; }

 private:
  // coord: {query tile, batch * heads_q + head}
  __device__ __forceinline__ Fa3Tile(const FwdParams& p, const WindowMask& padded_mask, int2 coord)
      : m_block(coord.x),
        b(coord.y / p.heads_q),
        h(coord.y % p.heads_q),
        seq(fa3::sequence<kVarlen>(p, b)),
        mask(kVarlen ? WindowMask::of(p, seq) : padded_mask) {
    m0 = m_block * Tr::kBlockM;
    m_end = min(m0 + Tr::kBlockM, seq.seqlen_q);
    const int key_begin = mask.key_begin(m0), key_end = mask.key_end(m_end);
    const int n_begin = key_begin / Tr::kBlockN;
    n_end = key_end > key_begin ? (key_end + Tr::kBlockN - 1) / Tr::kBlockN : n_begin;
    n_count = n_end - n_begin;
    // Varlen: a tile past its sequence's end (the grid counts the longest one) has no row; it loads nothing, and
    // its epilogue stores nothing (every row >= seqlen_q). Padded tiles always start inside the sequence.
    if (kVarlen && m0 >= seq.seqlen_q) n_end = n_count = 0;
    n_window = n_count;
    if constexpr (kGlobal) {
      if (n_window > 0) n_count += (p.num_global + Tr::kBlockN - 1) / Tr::kBlockN;
    }
  }
};

// kGlobal: the Longformer global keys as extra key tiles (FwdParams::global_*; padded batches only), loaded
// through tmap_gk / tmap_gv (otherwise unused).
template <typename Tr, bool kVarlen, bool kGlobal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fa3_fwd_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ CUtensorMap tmap_q,
                   const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                   const __grid_constant__ CUtensorMap tmap_gk, const __grid_constant__ CUtensorMap tmap_gv,
                   int num_tiles) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim;
  constexpr int kPanels = Tr::kPanels;

  extern __shared__ char smem_raw[];
  char* smem = align_smem_1024(smem_raw);
  constexpr int kQBuffers = Tr::kQBuffers;
  char* sQ = smem;                                  // Q buffer b at sQ + b * kQBytes
  char* sK = sQ + kQBuffers * Tr::kQBytes;          // stage s at sK + s * kKVBytes
  char* sV = sK + Tr::kKStages * Tr::kKVBytes;
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + Tr::kBarrierOffset);  // Q of buffer b landed
  uint64_t* bar_q_free = bar_q + kQBuffers;         // both consumers are done with buffer b (Q, staged O)
  uint64_t* bar_k = bar_q_free + kQBuffers;         // K of stage s landed
  uint64_t* bar_v = bar_k + Tr::kKStages;           // V of stage s landed
  uint64_t* bar_k_free = bar_v + Tr::kVStages;      // both consumers are done with K of stage s
  uint64_t* bar_v_free = bar_k_free + Tr::kKStages;  // ... with V of stage s

  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;  // varlen: of the longest sequence
  const WindowMask padded_mask{p.seqlen_q, p.seqlen_k, p.window_left, p.window_right};
  const fa3::TileOrder order(p, kD, static_cast<int>(sizeof(T)), static_cast<int>(gridDim.x) >= num_tiles);
  if constexpr (kVarlen) {
    // One tile per block (not persistent) and that tile past its sequence's end: the whole block leaves before
    // any barrier (cheaper than the empty-tile path below for the many such blocks of a varlen grid).
    if (static_cast<int>(gridDim.x) >= num_tiles) {
      const Fa3Tile<Tr, kVarlen, kGlobal> tl(p, padded_mask, order, blockIdx.x, num_m_blocks);
      if (tl.m0 >= tl.seq.seqlen_q) return;
    }
  }

  if (threadIdx.x == 0) {
    for (int b = 0; b < kQBuffers; ++b) {
      mbar_init(&bar_q[b], 1);
      mbar_init(&bar_q_free[b], Tr::kConsumers * 4);  // one arrive per consumer warp
    }
    // One loop in the order of the single-count ring, so equal counts build the same code as before the split.
    for (int s = 0; s < (Tr::kKStages > Tr::kVStages ? Tr::kKStages : Tr::kVStages); ++s) {
      if (s < Tr::kKStages) mbar_init(&bar_k[s], 1);
      if (s < Tr::kVStages) mbar_init(&bar_v[s], 1);
      if (s < Tr::kKStages) mbar_init(&bar_k_free[s], Tr::kConsumers * 4);
      if (s < Tr::kVStages) mbar_init(&bar_v_free[s], Tr::kConsumers * 4);
    }
    mbar_fence_init();
  }
  __syncthreads();

  // Phases run on across tiles: `it` counts K/V tiles (K stage it % kKStages, use it / kKStages of that stage; V
  // likewise with kVStages), `q_it` counts Q loads (buffer q_it % kQBuffers, use q_it / kQBuffers). Tiles with no
  // visible key load nothing on either side.
  const int warpgroup = warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    regs_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    tma_prefetch_desc(&tmap_q);
    tma_prefetch_desc(&tmap_k);
    tma_prefetch_desc(&tmap_v);
    if constexpr (kGlobal) {
      tma_prefetch_desc(&tmap_gk);
      tma_prefetch_desc(&tmap_gv);
    }
    int it = 0, q_it = 0;
    for (int round = 0; round * static_cast<int>(gridDim.x) < num_tiles; ++round) {
      const int tile = fa3::persistent_tile(round);
      if (tile >= num_tiles) continue;
      const Fa3Tile<Tr, kVarlen, kGlobal> tl(p, padded_mask, order, tile, num_m_blocks);
      if (tl.n_count == 0) continue;
      const int hk = tl.h / p.head_group;
      const int qb = q_it % kQBuffers, q_use = q_it / kQBuffers;
      if (q_use > 0) mbar_wait(&bar_q_free[qb], (q_use - 1) & 1);
      mbar_arrive_expect_tx(&bar_q[qb], Tr::kQBytes);
      const fa3::TmaRow q_at = fa3::q_rows(tl.seq, tl.m0);
#pragma unroll
      for (int c = 0; c < kPanels; ++c)
        tma_load_4d(sQ + qb * Tr::kQBytes + c * Tr::kPanelQ, &tmap_q, &bar_q[qb], c * 64, q_at.row, tl.h, q_at.batch);
      ++q_it;
      for (int i = 0; i < tl.n_count; ++i, ++it) {
        const int k_stage = it % Tr::kKStages, v_stage = it % Tr::kVStages;
        // Use r of a stage waits for release r - 1 (completion r - 1 of its free barrier).
        const uint32_t k_free_parity = ((it / Tr::kKStages) & 1) ^ 1, v_free_parity = ((it / Tr::kVStages) & 1) ^ 1;
        char* k_dst = sK + k_stage * Tr::kKVBytes;
        char* v_dst = sV + v_stage * Tr::kKVBytes;
        // Window steps: the key tile at n0(i); global steps: rows of the gathered global K/V of batch b.
        const bool global_step = kGlobal && i >= tl.n_window;
        const fa3::TmaRow kv_at =
            global_step ? fa3::TmaRow{(i - tl.n_window) * kBlockN, tl.b} : fa3::k_rows(tl.seq, tl.n0(i));
        const CUtensorMap* k_map = global_step ? &tmap_gk : &tmap_k;
        const CUtensorMap* v_map = global_step ? &tmap_gv : &tmap_v;
        if (it >= Tr::kKStages) mbar_wait(&bar_k_free[k_stage], k_free_parity);
        mbar_arrive_expect_tx(&bar_k[k_stage], Tr::kKVBytes);
#pragma unroll
        for (int c = 0; c < kPanels; ++c)
          tma_load_4d(k_dst + c * Tr::kPanelKV, k_map, &bar_k[k_stage], c * 64, kv_at.row, hk, kv_at.batch);
        if (it >= Tr::kVStages) mbar_wait(&bar_v_free[v_stage], v_free_parity);
        mbar_arrive_expect_tx(&bar_v[v_stage], Tr::kKVBytes);
#pragma unroll
        for (int c = 0; c < kPanels; ++c)
          tma_load_4d(v_dst + c * Tr::kPanelKV, v_map, &bar_v[v_stage], c * 64, kv_at.row, hk, kv_at.batch);
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  regs_alloc<Tr::kConsumerRegs>();
  const int cw = warpgroup - 1;                        // consumer index: query rows [64 cw, 64 cw + 64) of a tile
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const uint32_t k_smem = sm90::smem_addr(sK), v_smem = sm90::smem_addr(sV);
  using C = fa3::Consumer<Tr>;
  auto kstage_of = [](int it) { return it % Tr::kKStages; };
  auto kparity_of = [](int it) { return static_cast<uint32_t>((it / Tr::kKStages) & 1); };
  auto vstage_of = [](int it) { return it % Tr::kVStages; };
  auto vparity_of = [](int it) { return static_cast<uint32_t>((it / Tr::kVStages) & 1); };
  auto release = [&](uint64_t* bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  // Ping-pong (Tr::kPingPong): the consumers take turns issuing their GEMMs (in a ring), so one warpgroup's
  // softmax runs while another's GEMMs occupy the tensor cores. Named barrier 1 + cw is "consumer cw may
  // issue"; consumer 0 goes first (the last consumer's opening pass) and consumes the last consumer's closing
  // pass at exit, so no arrive is left pending.
  auto sched_wait = [&] {
    if constexpr (Tr::kPingPong) named_sync(1 + cw, 256);
  };
  auto sched_pass = [&] {
    if constexpr (Tr::kPingPong) named_arrive(1 + (cw + 1) % Tr::kConsumers, 256);
  };
  if (cw == Tr::kConsumers - 1) sched_pass();

  using Tile = Fa3Tile<Tr, kVarlen, kGlobal>;
  float acc_o[kD / 2];
  float row_max[2], row_sum[2];  // log2 domain (scores * scale * log2 e); row_sum per thread, reduced at the end
  float scale_o[2];
  float acc_s[kBlockN / 2];
  uint32_t p_frag[kBlockN / 16][4];
  uint32_t q_frag[Tr::kQInRegs ? kD / 16 : 1][4];
  auto q_rows_of = [&](int q_load) {  // this warpgroup's 64 rows of the Q buffer of the q_load-th Q load
    return sQ + (q_load % kQBuffers) * Tr::kQBytes + cw * 64 * 128;
  };
  auto qk = [&](int it_k, uint32_t q_base) {
    if constexpr (Tr::kQInRegs) C::issue_qk_rs(acc_s, q_frag, k_smem + kstage_of(it_k) * Tr::kKVBytes);
    else C::issue_qk(acc_s, q_base, k_smem + kstage_of(it_k) * Tr::kKVBytes);
  };
  // One turn of the pipeline: S = Q K(k_it)^T and O += P V(v_it) issued together (after O is rescaled to the
  // max of the S that P came from, on the CUDA cores while S runs), in this consumer's ping-pong turn.
  auto issue_qk_pv = [&](int k_it, uint32_t q_base, int v_it) {
    sched_wait();
    wgmma_fence();
    qk(k_it, q_base);
    wgmma_commit();
    C::rescale_o(acc_o, scale_o);
    wgmma_fence();
    C::issue_pv(acc_o, p_frag, v_smem + vstage_of(v_it) * Tr::kKVBytes);
    wgmma_commit();
    sched_pass();
  };
  // Keys past the sequence's length (zeros, or the next sequence's rows when packed) are masked here too.
  auto needs_mask = [](const Tile& tl, int i) {
    return !tl.mask.tile_fully_visible(tl.m0, tl.m_end, tl.n0(i), tl.n0(i) + kBlockN);
  };
  auto row0_of = [&](const Tile& tl) { return tl.m0 + cw * 64 + warp * 16 + g; };  // and row0 + 8

  // Epilogue of a tile: normalise, write O and lse, rows < the sequence's seqlen_q (nothing reaches the next
  // packed sequence). `sQw`: the tile's Q rows of this warpgroup (null: no Q buffer, store from registers).
  auto epilogue = [&](const Tile& tl, char* sQw, const float (&rsum)[2], const float (&rmax)[2]) {
    T* o = tl.seq.q_side(static_cast<T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, tl.h);
    float* lse = p.lse + lse_row0(p, tl.seq, tl.h);
    const int row0 = row0_of(tl);
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = fa3::quad_sum(rsum[r]);
      inv[r] = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row0 + 8 * r;
      if (t == 0 && row < tl.seq.seqlen_q)
        lse[row] = sum > 0.f ? (rmax[r] + __log2f(sum)) * 0.69314718055994530942f : -INFINITY;
    }
    if (Tr::kStagedO && sQw != nullptr) {
      // O in this warpgroup's rows of the Q buffer (its own Q rows; its S GEMMs are done), in Q's swizzled
      // layout: the pair at (row rr, columns 8j + 2t, +1) goes to 16-byte chunk (j % 8) ^ (rr % 8) of panel j / 8;
      // a warp's 8 rows hit 8 different chunks, no bank conflicts. Then 16-byte copies, consecutive threads
      // along a row, instead of 4-byte stores that fill half of each 32-byte sector.
#pragma unroll
      for (int j = 0; j < kD / 8; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rr = warp * 16 + g + 8 * r;
          *reinterpret_cast<uint32_t*>(sQw + (j / 8) * Tr::kPanelQ + rr * 128 + (((j % 8) ^ (rr % 8)) << 4) + 4 * t) =
              fa3::pack2<T>(acc_o[4 * j + 2 * r] * inv[r], acc_o[4 * j + 2 * r + 1] * inv[r]);
        }
      named_sync(1 + Tr::kConsumers + cw, 128);  // ids past the ping-pong's
      constexpr int kChunks = kD / 8;  // 16-byte chunks per row
#pragma unroll
      for (int k = 0; k < 64 * kChunks / 128; ++k) {
        const int q = tid + 128 * k, rr = q / kChunks, c = q % kChunks;
        const uint4 v = *reinterpret_cast<const uint4*>(sQw + (c / 8) * Tr::kPanelQ + rr * 128 + (((c % 8) ^ (rr % 8)) << 4));
        const int row = tl.m0 + cw * 64 + rr;
        if (row < tl.seq.seqlen_q) *reinterpret_cast<uint4*>(o + static_cast<int64_t>(row) * p.o_row_stride + 8 * c) = v;
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row >= tl.seq.seqlen_q) continue;
        T* orow = o + static_cast<int64_t>(row) * p.o_row_stride;
#pragma unroll
        for (int j = 0; j < kD / 8; ++j)
          *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * t) =
              fa3::pack2<T>(acc_o[4 * j + 2 * r] * inv[r], acc_o[4 * j + 2 * r + 1] * inv[r]);
      }
    }
  };
  // A tile with no visible key (varlen tiles past their sequence, rows a window leaves empty): zeros, lse -inf.
  auto write_empty = [&](const Tile& tl) {
    T* o = tl.seq.q_side(static_cast<T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, tl.h);
    float* lse = p.lse + lse_row0(p, tl.seq, tl.h);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0_of(tl) + 8 * r;
      if (row >= tl.seq.seqlen_q) continue;
      if (t == 0) lse[row] = -INFINITY;
      T* orow = o + static_cast<int64_t>(row) * p.o_row_stride;
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * t) = 0u;
    }
  };
  auto reset_state = [&] {
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) acc_o[i] = 0.f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  };

  // This block's tiles in order (the producer walks the same order); a tile with no visible key gets its
  // zeros and lse -inf here, on the way, and is skipped by both sides. Returns the next tile with work, or -1.
  int round = 0;
  auto find_tile = [&]() -> int {
    for (; round * static_cast<int>(gridDim.x) < num_tiles; ++round) {
      const int tile = fa3::persistent_tile(round);
      if (tile >= num_tiles) continue;
      const Tile tl(p, padded_mask, order, tile, num_m_blocks);
      if (tl.n_count > 0) {
        ++round;
        return tile;
      }
      write_empty(tl);
    }
    return -1;
  };

  // `it` counts K/V tiles over the whole block (stages it % kKStages, it % kVStages), `q_it` Q loads (tiles with work).
  int it = 0, q_it = 0;
  // The epilogue of tile tl (Q load q_it), then, with staged O, its Q buffer back to the producer.
  auto finish_tile = [&](const Tile& tl, char* sQw, const float (&rsum)[2], const float (&rmax)[2]) {
    epilogue(tl, sQw, rsum, rmax);
    if (Tr::kStagedO) {
      fence_proxy_async_smem();  // the epilogue's shared-memory accesses before the TMA load that refills it
      release(&bar_q_free[q_it % kQBuffers]);
    }
  };
  int first_step = 1;  // the current tile's first key step in the loop (2: the boundary ran step 1, kEpilogueUnderS)
  int tile = find_tile();
  if (tile >= 0) {
    // The first S GEMM of tile tl (Q load q_it, K/V tile it), its softmax, P packed.
    auto open_tile = [&](const Tile& tl) {
      const uint32_t q_base = sm90::smem_addr(q_rows_of(q_it));
      reset_state();
      mbar_wait(&bar_q[q_it % kQBuffers], (q_it / kQBuffers) & 1);
      if constexpr (Tr::kQInRegs) C::load_q(q_frag, q_base, warp, lane);
      mbar_wait(&bar_k[kstage_of(it)], kparity_of(it));
      sched_wait();
      wgmma_fence();
      qk(it, q_base);
      wgmma_commit();
      sched_pass();
      wgmma_wait<0>();
      fence_regs(acc_s);
      release(&bar_k_free[kstage_of(it)]);
      if (!Tr::kStagedO && tl.n_count == 1) release(&bar_q_free[q_it % kQBuffers]);
      C::softmax(acc_s, row_max, row_sum, scale_o, tl.mask, needs_mask(tl, 0), row0_of(tl), tl.n0(0), t, p.scale_log2);
      C::pack_p(p_frag, acc_s);
    };
    open_tile(Tile(p, padded_mask, order, tile, num_m_blocks));
    while (true) {
      // Rebuilt from the tile number each time (a few integer ops) rather than carried: a Tile variable live
      // across the loop costs registers that D256 does not have.
      const Tile tl(p, padded_mask, order, tile, num_m_blocks);
      // Software pipeline over the tile's K/V tiles: while the tensor cores run S(i) = Q K(i)^T and
      // O += P(i-1) V(i-1), the warpgroup computes the softmax of S(i) as soon as S(i) is done, overlapping
      // the PV GEMM of the previous tile.
      const int n = tl.n_count, row0 = row0_of(tl);
      const uint32_t q_base = sm90::smem_addr(q_rows_of(q_it));
      const int i0 = Tr::kEpilogueUnderS ? first_step : 1;
      if constexpr (Tr::kEpilogueUnderS) first_step = 1;
      for (int i = i0; i < n; ++i) {
        const int cur = it + i, prev = it + i - 1;
        mbar_wait(&bar_k[kstage_of(cur)], kparity_of(cur));
        mbar_wait(&bar_v[vstage_of(prev)], vparity_of(prev));
        issue_qk_pv(cur, q_base, prev);
        wgmma_wait<1>();  // S(i) done; PV(i-1) may still run
        fence_regs(acc_s);
        release(&bar_k_free[kstage_of(cur)]);
        if (!Tr::kStagedO && i == n - 1) release(&bar_q_free[q_it % kQBuffers]);
        if (kGlobal && i >= tl.n_window) {
          const int g0 = (i - tl.n_window) * kBlockN;
          C::mask_global(acc_s, tl.mask, p.global_pos + static_cast<int64_t>(tl.b) * p.num_global + g0,
                         p.num_global - g0, row0, t, p.global_causal);
          C::softmax(acc_s, row_max, row_sum, scale_o, tl.mask, false, row0, 0, t, p.scale_log2);
        } else {
          C::softmax(acc_s, row_max, row_sum, scale_o, tl.mask, needs_mask(tl, i), row0, tl.n0(i), t, p.scale_log2);
        }
        wgmma_wait<0>();  // PV(i-1) done: O and p_frag may be rewritten, V(i-1) released
        fence_regs(acc_o);
        release(&bar_v_free[vstage_of(prev)]);
        C::pack_p(p_frag, acc_s);
      }
      const int last = it + n - 1;
      char* sQw = Tr::kStagedO ? q_rows_of(q_it) : nullptr;
      // Two Q buffers: the next tile is looked up now, to be opened under this tile's last PV. One buffer: after
      // the epilogue (no tile state of the next tile is live while O takes half of the registers).
      int next = Tr::kQBuffers == 2 ? find_tile() : -1;
      if (Tr::kQBuffers == 2 && next >= 0) {
        // Across the tile boundary, as inside a tile: the next tile's first S GEMM is issued with this tile's
        // last PV GEMM, and its softmax runs while that PV runs; then this tile's epilogue. (With one Q buffer
        // the next Q loads only after this tile's last S: waiting for it here would delay the last PV.)
        const Tile nt(p, padded_mask, order, next, num_m_blocks);
        const int nq = q_it + 1, first = it + n;
        const uint32_t nq_base = sm90::smem_addr(q_rows_of(nq));
        mbar_wait(&bar_q[nq % kQBuffers], (nq / kQBuffers) & 1);
        if constexpr (Tr::kQInRegs) C::load_q(q_frag, nq_base, warp, lane);
        mbar_wait(&bar_k[kstage_of(first)], kparity_of(first));
        mbar_wait(&bar_v[vstage_of(last)], vparity_of(last));
        issue_qk_pv(first, nq_base, last);
        wgmma_wait<1>();  // the next tile's S done; this tile's last PV may still run
        fence_regs(acc_s);
        release(&bar_k_free[kstage_of(first)]);
        const float rsum[2] = {row_sum[0], row_sum[1]}, rmax[2] = {row_max[0], row_max[1]};
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;
        C::softmax(acc_s, row_max, row_sum, scale_o, nt.mask, needs_mask(nt, 0), row0_of(nt), nt.n0(0), t,
                   p.scale_log2);
        wgmma_wait<0>();  // this tile's O is final
        fence_regs(acc_o);
        release(&bar_v_free[vstage_of(last)]);
        if (Tr::kEpilogueUnderS && !kGlobal && nt.n_count >= 2) {
          // The next tile's P(0) out of acc_s, its S(1) into acc_s under this tile's epilogue, then its step 1
          // here (PV(0) writes O: no zeroing), so the loop resumes at step 2 with no wgmma in flight.
          C::pack_p(p_frag, acc_s);
          mbar_wait(&bar_k[kstage_of(first + 1)], kparity_of(first + 1));
          sched_wait();
          wgmma_fence();
          qk(first + 1, nq_base);
          wgmma_commit();
          sched_pass();
          finish_tile(tl, sQw, rsum, rmax);
          mbar_wait(&bar_v[vstage_of(first)], vparity_of(first));
          sched_wait();
          wgmma_fence();
          C::issue_pv(acc_o, p_frag, v_smem + vstage_of(first) * Tr::kKVBytes, false);
          wgmma_commit();
          sched_pass();
          wgmma_wait<1>();  // S(1) done
          fence_regs(acc_s);
          release(&bar_k_free[kstage_of(first + 1)]);
          C::softmax(acc_s, row_max, row_sum, scale_o, nt.mask, needs_mask(nt, 1), row0_of(nt), nt.n0(1), t,
                     p.scale_log2);
          wgmma_wait<0>();  // PV(0) done
          fence_regs(acc_o);
          release(&bar_v_free[vstage_of(first)]);
          C::pack_p(p_frag, acc_s);
          first_step = 2;
          it += n;
          ++q_it;
          tile = next;
          continue;
        }
        finish_tile(tl, sQw, rsum, rmax);
#pragma unroll
        for (int i = 0; i < kD / 2; ++i) acc_o[i] = 0.f;
        C::pack_p(p_frag, acc_s);
        it += n;
        ++q_it;
        tile = next;
        continue;
      }
      // The last tile (or one Q buffer): the last PV alone, then the epilogue.
      mbar_wait(&bar_v[vstage_of(last)], vparity_of(last));
      C::rescale_o(acc_o, scale_o);
      sched_wait();
      wgmma_fence();
      C::issue_pv(acc_o, p_frag, v_smem + vstage_of(last) * Tr::kKVBytes);
      wgmma_commit();
      sched_pass();
      wgmma_wait<0>();
      fence_regs(acc_o);
      release(&bar_v_free[vstage_of(last)]);
      finish_tile(tl, sQw, row_sum, row_max);
      it += n;
      ++q_it;
      if (Tr::kQBuffers == 1) next = find_tile();
      if (next < 0) break;
      tile = next;
      open_tile(Tile(p, padded_mask, order, tile, num_m_blocks));
    }
  }
  if (cw == 0) sched_wait();
#endif
}

}  // namespace fae
