// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16 + ldmatrix + cp.async).
//
// One block per (query tile of kBlockM rows, batch, head): the sequence is parallelised across blocks and
// the K/V loop runs inside the block. Each warp owns kBlockM / kWarps query rows (split-Q) and their
// softmax state, so warps never exchange partial results. K/V tiles sit in a ring of kStages shared-memory
// stages (double buffering at kStages = 2) and are fetched with cp.async kStages - 1 tiles ahead; S = Q K^T and O += P V stay in registers, P is fed to the
// second mma straight from the first one's accumulators. Normalisation by 1/l happens once, at the end.
#pragma once
#include <cuda_runtime.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../common/seqlen.h"
#include "../../sm80/epilogue.h"
#include "../../sm80/ptx.h"
#include "../../sm80/smem_tile.h"
#include "../../sm80/warp_gemm.h"
#include "../../common/softmax.h"
#include "../../common/tile_size.h"

namespace fae {

template <typename T_, int kHeadDim_>
struct Fa2FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr TileShape kTile = fa2_fwd_tile(kHeadDim);
  static constexpr int kBlockM = kTile.block_m, kBlockN = kTile.block_n, kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;   // 16-row mma tiles per warp
  static constexpr int kNTiles = kBlockN / 8;      // 8-key mma tiles of S
  static constexpr int kDTiles = kHeadDim / 8;     // 8-column mma tiles of O
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kStages = kTile.stages;
  // Q, then kStages stages of (K, V).
  static constexpr int kSmemBytes = QTile::kBytes + 2 * kStages * KVTile::kBytes;
  static constexpr int kMinBlocksPerSm = kThreads == 128 ? 2 : 1;
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSm)
    fa2_fwd_kernel(const __grid_constant__ FwdParams p) {
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim;
  constexpr int kMT = Tr::kMTiles, kNT = Tr::kNTiles, kDT = Tr::kDTiles;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;

  extern __shared__ __align__(16) char smem[];
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK0 = sQ + QTile::kBytes;  // stage s: K at sK0 + 2*s*KV, V at sK0 + (2*s+1)*KV

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  // Flat grid, heads outermost; within a head the last (for causal: heaviest) query tiles launch first. The
  // grid is sized by the longest sequence (p.seqlen_q); tiles past this sequence's end have nothing to do.
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int bh = blockIdx.x / num_m_blocks;
  const int m_block = num_m_blocks - 1 - blockIdx.x % num_m_blocks;
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.head_group;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int m_end = min(m0 + kBlockM, seq.seqlen_q);

  const T* q = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h);
  const T* k = seq.k_side(static_cast<const T*>(p.k), p.k_batch_stride, p.k_head_stride, p.k_row_stride, hk);
  const T* v = seq.k_side(static_cast<const T*>(p.v), p.v_batch_stride, p.v_head_stride, p.v_row_stride, hk);
  T* o = seq.q_side(static_cast<T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, h);
  float* lse = p.lse + lse_row0(p, seq, h);

  const WindowMask mask = WindowMask::of(p, seq);
  const int key_begin = mask.key_begin(m0), key_end = mask.key_end(m_end);
  const int n_block_begin = key_begin / kBlockN;
  const int n_block_end = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_block_begin;

  // Per-thread accumulators: O rows (g, g+8) of each of its kMT m-tiles, and their softmax states.
  float acc_o[kMT][kDT][4];
  zero_acc(acc_o);
  SoftmaxState state[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) state[mi][0].init(), state[mi][1].init();

  constexpr int kStages = Tr::kStages;
  // Tile n_block_begin + i lives in ring stage i % kStages; K at sK0 + 2 * stage * KV, V right after it.
  auto load_kv = [&](int stage, int n_block) {
    const uint32_t sKs = sK0 + 2 * stage * KVTile::kBytes;
    if (n_block < n_block_end) {
      KVTile::template load_async<Tr::kThreads>(sKs, k, p.k_row_stride, n_block * kBlockN, seq.seqlen_k, tid);
      cp_async_commit();
      KVTile::template load_async<Tr::kThreads>(sKs + KVTile::kBytes, v, p.v_row_stride, n_block * kBlockN,
                                                seq.seqlen_k, tid);
      cp_async_commit();
    } else {
      cp_async_commit();  // empty groups keep the wait counts below uniform
      cp_async_commit();
    }
  };
  if (n_block_begin < n_block_end) {
    QTile::template load_async<Tr::kThreads>(sQ, q, p.q_row_stride, m0, seq.seqlen_q, tid);
    cp_async_commit();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_kv(s, n_block_begin + s);
  }

  const int warp_row0 = m0 + warp * Tr::kWarpRows;  // first query row of this warp
  int stage = 0;
  for (int n_block = n_block_begin; n_block < n_block_end; ++n_block, stage = stage + 1 == kStages ? 0 : stage + 1) {
    const int n0 = n_block * kBlockN;
    const uint32_t sK = sK0 + 2 * stage * KVTile::kBytes, sV = sK + KVTile::kBytes;
    // Groups newer than this K tile: its V and the (K, V) pairs of the kStages - 2 tiles after it.
    cp_async_wait<2 * kStages - 3>();
    // One barrier serves twice: this K tile is visible to all warps, and every warp has finished the previous
    // iteration, so its stage can be refilled with the tile kStages - 1 ahead while this one is computed.
    __syncthreads();
    load_kv(stage == 0 ? kStages - 1 : stage - 1, n_block + kStages - 1);

    // S = Q K^T for this warp's rows.
    float acc_s[kMT][kNT][4];
    zero_acc(acc_s);
    gemm_abt<T, QTile, KVTile, kD>(acc_s, sQ, warp * Tr::kWarpRows, sK, 0, lane);

    // Mask (only tiles that straddle the window or the end of the keys pay for it).
    if (!mask.tile_fully_visible(warp_row0, warp_row0 + Tr::kWarpRows, n0, n0 + kBlockN)) {
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = warp_row0 + mi * 16 + g + (e >= 2) * 8;
            const int col = n0 + ni * 8 + 2 * t + (e & 1);
            if (!mask.visible(row, col)) acc_s[mi][ni][e] = -INFINITY;
          }
    }

    // Online softmax in the log2 domain: P = exp2(S * scale_log2 - m), O and l rescaled by the max's change.
    float factor[kMT][2];
    bool max_moved = false;
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni) mx = fmaxf(mx, fmaxf(acc_s[mi][ni][2 * half], acc_s[mi][ni][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        SoftmaxState& st = state[mi][half];
        factor[mi][half] = st.rescale_to(mx * p.scale_log2);
        max_moved |= factor[mi][half] != 1.f;
        const float offset = st.exp_offset();
        float sum = 0.f;
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float pe = exp2_approx(fmaf(acc_s[mi][ni][e], p.scale_log2, -offset));
            acc_s[mi][ni][e] = pe;
            sum += pe;
          }
        st.l += sum;  // per-thread partial sum over its columns; the quad is summed once at the end
      }
    // After the first few tiles the running max rarely moves: with 32-key tiles the O rescale (kMT * kDT * 4
    // multiplies per thread) is worth a warp vote to skip (+3% at D128 on H100); with wider tiles it is not
    // (the vote cost 4% at D64).
    constexpr bool kVoteRescale = kBlockN <= 32;
    if (!kVoteRescale || __any_sync(0xffffffff, max_moved)) {
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int di = 0; di < kDT; ++di)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_o[mi][di][e] *= factor[mi][e / 2];
    }

    // The S accumulator layout of two adjacent key tiles is the A-operand layout of one k16 step of P V:
    // pack P to 16 bits now, so only half the registers stay live through the second product.
    uint32_t p_frag[kMT][kBlockN / 16][4];
    pack_a_frags<T>(p_frag, acc_s);

    cp_async_wait<2 * kStages - 2>();  // this V tile has landed (the next tiles may still be in flight)
    __syncthreads();

    gemm_rb<T, KVTile>(acc_o, p_frag, sV, 0, 0, lane);  // O += P V
  }
  cp_async_wait<0>();

  // Epilogue: normalise once, stage this warp's rows of O in its own rows of the Q tile (each warp only ever
  // read its own Q rows), then write 16-byte coalesced rows.
  float inv[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      SoftmaxState& st = state[mi][half];
      st.l += __shfl_xor_sync(0xffffffff, st.l, 1);
      st.l += __shfl_xor_sync(0xffffffff, st.l, 2);
      inv[mi][half] = st.inv_sum();
      const int r = warp * Tr::kWarpRows + mi * 16 + g + half * 8;
      if (t == 0 && m0 + r < seq.seqlen_q) lse[m0 + r] = st.lse();
    }
  stage_acc<T, QTile>(sQ, warp * Tr::kWarpRows, 0, acc_o, lane, [&](int mi, int half) { return inv[mi][half]; });
  __syncthreads();
  store_tile_rows<Tr::kThreads, QTile>(m0, seq.seqlen_q, tid, TileOut<T>{sQ, o, p.o_row_stride});
}

}  // namespace fae
