// FlashAttention-2 backward, main kernel: dK and dV (and, unless deterministic, dQ through fp32 atomics).
//
// One block per (K/V tile of kBlockN keys, batch, kv head). The block loops over every query head of the GQA
// group and, for each, over the query tiles that can see its keys, so dK/dV of the whole group accumulate in
// registers: no per-query-head expanded buffer, memory independent of the group size.
//
// Warps split the keys (kWarpKeys each) and compute the transposed products S^T = K Q^T and dP^T = V dO^T.
// Their accumulators (rows = keys, cols = queries) are exactly the mma A-operand layout with k = queries, so
// dV += P^T dO and dK += dS^T Q take P^T and dS^T straight from registers; only dQ += dS K needs dS in shared
// memory (stored once as dS^T, read back through ldmatrix.trans). Operands:
//   S^T  = K Q^T   A: K rows (ldmatrix)          B: Q rows (ldmatrix, k = D)
//   dP^T = V dO^T  A: V rows (ldmatrix)          B: dO rows (ldmatrix, k = D)
//   dV  += P^T dO  A: P^T from registers         B: dO (ldmatrix.trans, k = queries)
//   dK  += dS^T Q  A: dS^T from registers        B: Q (ldmatrix.trans, k = queries)
//   dQ  += dS K    A: dS from smem dS^T (ldmatrix.trans)   B: K (ldmatrix.trans, k = keys)
// Q, dO, lse and Delta of the next query tile are fetched with cp.async while the current one is computed.
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

__host__ __device__ constexpr int bwd_min(int a, int b) { return a < b ? a : b; }

template <typename T_, int kHeadDim_>
struct Fa2BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr BwdTileShape kTile = fa2_bwd_tile(kHeadDim);
  static constexpr int kBlockM = kTile.block_m, kBlockN = kTile.block_n, kWarps = kTile.warps;
  static constexpr int kDSplit = kTile.d_split;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kKeyGroups = kWarps / kDSplit;   // warps with distinct keys
  static constexpr int kWarpKeys = kBlockN / kKeyGroups;
  static constexpr int kKT = kWarpKeys / 16;            // 16-key mma row tiles per warp
  static constexpr int kQT = kBlockM / 8;               // 8-query column tiles of S^T
  static constexpr int kWarpD = kHeadDim / kDSplit;     // dK/dV columns per warp
  static constexpr int kWDT = kWarpD / 8;
  // dQ (kBlockM x D) is tiled over the warps as kDqWarpsM x kDqWarpsD.
  static constexpr int kDqWarpsM = bwd_min(kWarps, kBlockM / 16);
  static constexpr int kDqWarpsD = kWarps / kDqWarpsM;
  static constexpr int kDqMT = kBlockM / 16 / kDqWarpsM;
  static constexpr int kDqD = kHeadDim / kDqWarpsD;
  static constexpr int kDqDT = kDqD / 8;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  using DsTile = SmemTile<kBlockN, kBlockM>;  // dS^T: keys x queries
  // K, V, two stages of (Q, dO), dS^T, two stages of (lse_log2, Delta).
  static constexpr int kOffV = KVTile::kBytes;
  static constexpr int kOffQ = 2 * KVTile::kBytes;        // stage s: Q at kOffQ + 2*s*QT, dO right after it
  static constexpr int kOffDs = kOffQ + 4 * QTile::kBytes;
  static constexpr int kOffRow = kOffDs + DsTile::kBytes; // stage s: lse at kOffRow + 2*s*M*4, Delta after it
  static constexpr int kSmemBytes = kOffRow + 4 * kBlockM * 4;
  static_assert(kWarps % kDSplit == 0 && kBlockN % (16 * kKeyGroups) == 0 && kWarpD % 16 == 0, "key split");
  static_assert(kBlockM % 16 == 0 && kHeadDim % 16 == 0 && kDqD % 16 == 0 && kWarps % kDqWarpsM == 0, "shape");
  static_assert(kThreads >= kBlockM / 2 && kBwdSeqRound % kBlockM == 0, "lse/Delta loaders, padded rows");
};


template <typename Tr, bool kAccumDq>
__global__ void __launch_bounds__(Tr::kThreads, 1) fa2_bwd_dkdv_kernel(const __grid_constant__ BwdParams p) {
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim;
  constexpr int kKT = Tr::kKT, kQT = Tr::kQT, kWDT = Tr::kWDT;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;
  using DsTile = typename Tr::DsTile;

  extern __shared__ __align__(16) char smem[];
  const uint32_t sK = smem_addr(smem), sV = sK + Tr::kOffV, sDs = sK + Tr::kOffDs;
  const float* s_row = reinterpret_cast<const float*>(smem + Tr::kOffRow);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int key_group = warp % Tr::kKeyGroups, d_part = warp / Tr::kKeyGroups;
  const int warp_key0 = key_group * Tr::kWarpKeys;  // first key of this warp, within the tile
  const int warp_d0 = d_part * Tr::kWarpD;          // first dK/dV column of this warp

  // Flat grid, (batch, kv head) outermost; the first key tiles (for causal: seen by the most queries) first.
  const int num_n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int bh = blockIdx.x / num_n_blocks, n_block = blockIdx.x % num_n_blocks;
  const int b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const SeqInfo seq = seq_info(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.seqlen_k) return;  // the grid is sized by the longest sequence (varlen)
  const int n_end = min(n0 + kBlockN, seq.seqlen_k);

  const T* k = seq.k_side(static_cast<const T*>(p.k), p.k_batch_stride, p.k_head_stride, p.k_row_stride, hk);
  const T* v = seq.k_side(static_cast<const T*>(p.v), p.v_batch_stride, p.v_head_stride, p.v_row_stride, hk);

  const WindowMask mask = WindowMask::of(p, seq);
  const int q_begin = mask.query_begin(n0), q_end = mask.query_end(n_end);
  const int m_block_begin = q_begin / kBlockM;
  const int num_m = q_end > q_begin ? (q_end + kBlockM - 1) / kBlockM - m_block_begin : 0;
  const int num_iters = num_m * p.head_group;  // (query head of the group, query tile) pairs, head outermost

  float acc_dk[kKT][kWDT][4], acc_dv[kKT][kWDT][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // Issue the loads of iteration `it` into `stage` (one cp.async group, committed by the caller).
  auto load_q_tile = [&](int stage, int it) {
    const int h = hk * p.head_group + it / num_m;
    const int m0 = (m_block_begin + it % num_m) * kBlockM;
    const uint32_t sQs = sK + Tr::kOffQ + 2 * stage * QTile::kBytes;
    const T* q = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h);
    const T* dout = seq.q_side(static_cast<const T*>(p.dout), p.do_batch_stride, p.do_head_stride, p.do_row_stride, h);
    QTile::template load_async<Tr::kThreads>(sQs, q, p.q_row_stride, m0, seq.seqlen_q, tid);
    QTile::template load_async<Tr::kThreads>(sQs + QTile::kBytes, dout, p.do_row_stride, m0, seq.seqlen_q, tid);
    // lse_log2 and Delta are padded to whole kBwdSeqRound tiles per sequence: whole 16-byte chunks, no bounds.
    const int64_t row = bwd_row0(p, seq, h) + m0;
    const uint32_t s_rows = sK + Tr::kOffRow + 2 * stage * kBlockM * 4;
    if (tid < kBlockM / 4) {
      cp_async_16(s_rows + tid * 16, p.lse_log2 + row + tid * 4, true);
    } else if (tid < kBlockM / 2) {
      const int c = tid - kBlockM / 4;
      cp_async_16(s_rows + kBlockM * 4 + c * 16, p.dsoftmax_sum + row + c * 4, true);
    }
  };

  if (num_iters > 0) {
    KVTile::template load_async<Tr::kThreads>(sK, k, p.k_row_stride, n0, seq.seqlen_k, tid);
    KVTile::template load_async<Tr::kThreads>(sV, v, p.v_row_stride, n0, seq.seqlen_k, tid);
    load_q_tile(0, 0);
    cp_async_commit();
  }

  for (int it = 0; it < num_iters; ++it) {
    const int stage = it & 1;
    cp_async_wait<0>();
    // This tile has landed for every thread, and every warp is done with the previous iteration (its stage,
    // and dS^T / K for dQ), so the other stage can be refilled while this one is computed.
    __syncthreads();
    if (it + 1 < num_iters) {
      load_q_tile(stage ^ 1, it + 1);
      cp_async_commit();
    }
    const int h = hk * p.head_group + it / num_m;
    const int m0 = (m_block_begin + it % num_m) * kBlockM;
    const uint32_t sQ = sK + Tr::kOffQ + 2 * stage * QTile::kBytes, sdO = sQ + QTile::kBytes;
    const float* s_lse = s_row + 2 * stage * kBlockM;
    const float* s_delta = s_lse + kBlockM;

    // S^T = K Q^T for this warp's keys (rows) and all kBlockM queries (columns). Also dP^T = V dO^T.
    auto k_times_qt = [&](float (&acc)[kKT][kQT][4], uint32_t sA, uint32_t sB) {
      zero_acc(acc);
      gemm_abt<T, KVTile, QTile, kD>(acc, sA, warp_key0, sB, 0, lane);
    };
    // acc_dx[ki] += A[ki] (this warp's keys x kBlockM queries, packed) * X (kBlockM x this warp's D columns).
    auto accumulate_dkv = [&](float (&acc)[kKT][kWDT][4], const uint32_t (&a)[kKT][kBlockM / 16][4], uint32_t sX) {
      gemm_rb<T, QTile>(acc, a, sX, 0, warp_d0, lane);
    };

    float acc_s[kKT][kQT][4];
    k_times_qt(acc_s, sK, sQ);

    // P^T = exp2(S^T * scale_log2 - lse_log2[query]). lse_log2 is +inf for padding rows and rows that see
    // nothing, so P = 0 there; masked (query, key) pairs, keys past the end included, are set to 0.
    const bool need_mask = !mask.tile_fully_visible(m0, m0 + kBlockM, n0 + warp_key0, n0 + warp_key0 + Tr::kWarpKeys);
#pragma unroll
    for (int qi = 0; qi < kQT; ++qi) {
      const float2 lse2 = *reinterpret_cast<const float2*>(s_lse + qi * 8 + 2 * t);
#pragma unroll
      for (int ki = 0; ki < kKT; ++ki)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pe = exp2_approx(fmaf(acc_s[ki][qi][e], p.scale_log2, -((e & 1) ? lse2.y : lse2.x)));
          if (need_mask) {
            const int key = n0 + warp_key0 + ki * 16 + g + (e >= 2) * 8;
            const int query = m0 + qi * 8 + 2 * t + (e & 1);
            if (!mask.visible(query, key)) pe = 0.f;
          }
          acc_s[ki][qi][e] = pe;
        }
    }

    uint32_t a_frag[kKT][kBlockM / 16][4];  // accumulator (keys x queries) -> A operands with k = queries
    pack_a_frags<T>(a_frag, acc_s);
    accumulate_dkv(acc_dv, a_frag, sdO);  // dV += P^T dO

    float acc_dp[kKT][kQT][4];
    k_times_qt(acc_dp, sV, sdO);  // dP^T = V dO^T

    // dS^T = P^T * (dP^T - Delta[query]) (the softmax Jacobian; scale is applied to dK/dQ once, at the end).
#pragma unroll
    for (int qi = 0; qi < kQT; ++qi) {
      const float2 delta = *reinterpret_cast<const float2*>(s_delta + qi * 8 + 2 * t);
#pragma unroll
      for (int ki = 0; ki < kKT; ++ki)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc_dp[ki][qi][e] = acc_s[ki][qi][e] * (acc_dp[ki][qi][e] - ((e & 1) ? delta.y : delta.x));
    }
    pack_a_frags<T>(a_frag, acc_dp);
    accumulate_dkv(acc_dk, a_frag, sQ);  // dK += dS^T Q

    if constexpr (kAccumDq) {
      // dS^T -> shared memory (one copy: the d_part 0 warps), the same packed values as the dK operand.
      if (d_part == 0) {
#pragma unroll
        for (int ki = 0; ki < kKT; ++ki)
#pragma unroll
          for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              // a[0]: (g, 2t) of query tile 2kk; a[1]: row g+8; a[2], a[3]: query tile 2kk+1.
              const int r = warp_key0 + ki * 16 + g + (j & 1) * 8, c = (2 * kk + (j >> 1)) * 8 + 2 * t;
              asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(DsTile::addr(sDs, r, c)), "r"(a_frag[ki][kk][j]));
            }
      }
      __syncthreads();

      // dQ (kBlockM x D) += dS K, this warp's (kDqMT*16 rows) x (kDqD columns) part, then fp32 atomics.
      const int wm = warp % Tr::kDqWarpsM, wd = warp / Tr::kDqWarpsM;
      float acc_dq[Tr::kDqMT][Tr::kDqDT][4];
      zero_acc(acc_dq);
      // dS rows (queries) come from dS^T, transposed by ldmatrix.
      gemm_atb<T, DsTile, KVTile, kBlockN>(acc_dq, sDs, wm * Tr::kDqMT * 16, sK, wd * Tr::kDqD, lane);
      float* dq = p.dq_accum + (bwd_row0(p, seq, h) + m0) * kD;
#pragma unroll
      for (int mi = 0; mi < Tr::kDqMT; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = (wm * Tr::kDqMT + mi) * 16 + g + half * 8;
          if (m0 + r < seq.seqlen_q) {  // padding rows hold zeros; skip their atomics
#pragma unroll
            for (int di = 0; di < Tr::kDqDT; ++di)
              red_add_f32x2(dq + r * kD + wd * Tr::kDqD + di * 8 + 2 * t, acc_dq[mi][di][2 * half],
                            acc_dq[mi][di][2 * half + 1]);
          }
        }
    }
  }

  // Epilogue: dK *= scale; stage dK in the K tile and dV in the V tile (after every warp is done reading
  // them), then write 16-byte coalesced rows. Blocks whose keys no query sees write zeros.
  __syncthreads();
  const float scale = p.scale;
  stage_acc<T, KVTile>(sK, warp_key0, warp_d0, acc_dk, lane, [=](int, int) { return scale; });
  stage_acc<T, KVTile>(sV, warp_key0, warp_d0, acc_dv, lane, [](int, int) { return 1.f; });
  __syncthreads();
  T* dk = seq.k_side(static_cast<T*>(p.dk), p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, hk);
  T* dv = seq.k_side(static_cast<T*>(p.dv), p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, hk);
  store_tile_rows<Tr::kThreads, KVTile>(n0, seq.seqlen_k, tid, TileOut<T>{sK, dk, p.dk_row_stride},
                                        TileOut<T>{sV, dv, p.dv_row_stride});
}

}  // namespace fae
