// FlashAttention-2 backward, deterministic dQ: one block per (query tile, batch, query head) loops over the
// K/V tiles its rows can see and accumulates dQ in registers, in a fixed order: bitwise reproducible, no
// atomics. It recomputes S = Q K^T and dP = dO V^T that the dK/dV kernel also computes, so deterministic mode
// costs 7 instead of 5 tile matmuls (about 1.4x the backward FLOPs) and a second pass over K and V.
//
// Structure of the forward kernel: warps own 16-row slices of the query tile; S and dP accumulators are the
// A-operand layout of dQ += dS K, so dS never leaves registers. Operands:
//   S  = Q K^T   A: Q rows (ldmatrix)   B: K rows (ldmatrix)
//   dP = dO V^T  A: dO rows (ldmatrix)  B: V rows (ldmatrix)
//   dQ += dS K   A: dS from registers   B: K (ldmatrix.trans, k = keys)
#pragma once
#include <cuda_runtime.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../common/seqlen.h"
#include "../../sm80/epilogue.h"
#include "../../sm80/ptx.h"
#include "../../sm80/smem_tile.h"
#include "../../sm80/warp_gemm.h"
#include "../../common/tile_size.h"

namespace fae {

template <typename T_, int kHeadDim_>
struct Fa2BwdDqTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr BwdTileShape kTile = fa2_bwd_tile(kHeadDim);
  static constexpr int kBlockM = kTile.dq_block_m, kBlockN = kTile.dq_block_n, kWarps = kTile.dq_warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMT = kWarpRows / 16;
  static constexpr int kNT = kBlockN / 8;
  static constexpr int kDT = kHeadDim / 8;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  // Q, dO, then two stages of (K, V).
  static constexpr int kSmemBytes = 2 * QTile::kBytes + 4 * KVTile::kBytes;
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
  static_assert(kBwdSeqRound % kBlockM == 0, "padded row buffers");
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fa2_bwd_dq_kernel(const __grid_constant__ BwdParams p) {
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim;
  constexpr int kMT = Tr::kMT, kNT = Tr::kNT, kDT = Tr::kDT;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;

  extern __shared__ __align__(16) char smem[];
  const uint32_t sQ = smem_addr(smem), sdO = sQ + QTile::kBytes, sK0 = sdO + QTile::kBytes;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int bh = blockIdx.x / num_m_blocks;
  const int m_block = num_m_blocks - 1 - blockIdx.x % num_m_blocks;
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.head_group;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;  // the grid is sized by the longest sequence (varlen)
  const int m_end = min(m0 + kBlockM, seq.seqlen_q);

  const T* q = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h);
  const T* dout = seq.q_side(static_cast<const T*>(p.dout), p.do_batch_stride, p.do_head_stride, p.do_row_stride, h);
  const T* k = seq.k_side(static_cast<const T*>(p.k), p.k_batch_stride, p.k_head_stride, p.k_row_stride, hk);
  const T* v = seq.k_side(static_cast<const T*>(p.v), p.v_batch_stride, p.v_head_stride, p.v_row_stride, hk);
  const int64_t row_base = bwd_row0(p, seq, h);

  const WindowMask mask = WindowMask::of(p, seq);
  const int key_begin = mask.key_begin(m0), key_end = mask.key_end(m_end);
  const int n_block_begin = key_begin / kBlockN;
  const int n_block_end = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_block_begin;

  const int warp_row0 = m0 + warp * Tr::kWarpRows;
  // Per-row lse_log2 (+inf for rows past the end / seeing nothing: P = 0) and Delta, rows g and g + 8.
  float lse2[kMT][2], delta[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = row_base + warp_row0 + mi * 16 + g + half * 8;
      lse2[mi][half] = p.lse_log2[r];
      delta[mi][half] = p.dsoftmax_sum[r];
    }

  float acc_dq[kMT][kDT][4];
  zero_acc(acc_dq);

  auto load_kv = [&](int stage, int n_block) {
    const uint32_t sKs = sK0 + 2 * stage * KVTile::kBytes;
    KVTile::template load_async<Tr::kThreads>(sKs, k, p.k_row_stride, n_block * kBlockN, seq.seqlen_k, tid);
    KVTile::template load_async<Tr::kThreads>(sKs + KVTile::kBytes, v, p.v_row_stride, n_block * kBlockN,
                                              seq.seqlen_k, tid);
    cp_async_commit();
  };
  if (n_block_begin < n_block_end) {
    QTile::template load_async<Tr::kThreads>(sQ, q, p.q_row_stride, m0, seq.seqlen_q, tid);
    QTile::template load_async<Tr::kThreads>(sdO, dout, p.do_row_stride, m0, seq.seqlen_q, tid);
    load_kv(0, n_block_begin);
  }

  // S = A B^T for this warp's rows, A (queries x D) and B (keys x D) both row-major tiles in shared memory.
  auto a_times_bt = [&](float (&acc)[kMT][kNT][4], uint32_t sA, uint32_t sB) {
    zero_acc(acc);
    gemm_abt<T, QTile, KVTile, kD>(acc, sA, warp * Tr::kWarpRows, sB, 0, lane);
  };

  int stage = 0;
  for (int n_block = n_block_begin; n_block < n_block_end; ++n_block, stage ^= 1) {
    const int n0 = n_block * kBlockN;
    const uint32_t sK = sK0 + 2 * stage * KVTile::kBytes, sV = sK + KVTile::kBytes;
    cp_async_wait<0>();
    __syncthreads();  // this K/V stage visible; every warp done with the other one
    if (n_block + 1 < n_block_end) load_kv(stage ^ 1, n_block + 1);

    float acc_s[kMT][kNT][4];
    a_times_bt(acc_s, sQ, sK);
    const bool need_mask = !mask.tile_fully_visible(warp_row0, warp_row0 + Tr::kWarpRows, n0, n0 + kBlockN);
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pe = exp2_approx(fmaf(acc_s[mi][ni][e], p.scale_log2, -lse2[mi][e >> 1]));
          if (need_mask) {
            const int row = warp_row0 + mi * 16 + g + (e >= 2) * 8;
            const int col = n0 + ni * 8 + 2 * t + (e & 1);
            if (!mask.visible(row, col)) pe = 0.f;
          }
          acc_s[mi][ni][e] = pe;
        }

    float acc_dp[kMT][kNT][4];
    a_times_bt(acc_dp, sdO, sV);
    // dS = P * (dP - Delta), packed straight into the A operand of dQ += dS K (k = keys).
    uint32_t ds_frag[kMT][kBlockN / 16][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int ni = 2 * kk + (j >> 1), e0 = (j & 1) * 2;
          const float d = delta[mi][j & 1];
          ds_frag[mi][kk][j] = pack2<T>(acc_s[mi][ni][e0] * (acc_dp[mi][ni][e0] - d),
                                        acc_s[mi][ni][e0 + 1] * (acc_dp[mi][ni][e0 + 1] - d));
        }

    gemm_rb<T, KVTile>(acc_dq, ds_frag, sK, 0, 0, lane);
  }
  cp_async_wait<0>();

  // Epilogue: dQ * scale, staged in this warp's own rows of the Q tile (only it read them), 16-byte stores.
  __syncthreads();  // Q may still be in flight for blocks with no K/V tile: wait above, then publish
  const float scale = p.scale;
  stage_acc<T, QTile>(sQ, warp * Tr::kWarpRows, 0, acc_dq, lane, [=](int, int) { return scale; });
  __syncthreads();
  T* dq = seq.q_side(static_cast<T*>(p.dq), p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, h);
  store_tile_rows<Tr::kThreads, QTile>(m0, seq.seqlen_q, tid, TileOut<T>{sQ, dq, p.dq_row_stride});
}

}  // namespace fae
