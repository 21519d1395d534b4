// FlashAttention-1 backward (Dao et al. 2022, Algorithm 4) on the same tensor-core primitives as the rest
// (mma.sync m16n8k16, ldmatrix, cp.async), so a comparison with the FA2 backward isolates the algorithm:
//
// * one block per (batch, query head); the K/V loop is the OUTER loop, the query-tile loop the inner one. The
//   block visits the same (K/V tile j, query tile i) pairs, in the same order, as the FA1 forward (Fa1Schedule);
// * dK_j and dV_j accumulate in registers over the inner loop and are written once per K/V tile;
// * dQ_i is read, updated and written back in global memory (fp32 dq_accum) at EVERY inner step: the FA1 round
//   trip. The block owns (b, h), so no atomics. A query tile's first visit skips the read and its last visit
//   writes dq (scaled, input dtype) directly, so there is neither a memset nor a conversion pass;
// * P is recomputed from the forward's lse, and D_i = rowsum(dO_i * O_i) is recomputed at every inner step
//   from O_i, as Algorithm 4 does (no preprocess kernel).
//
// Warps split the keys of the K/V tile (16 each) and compute the transposed products S^T = K Q^T and
// dP^T = V dO^T, whose accumulators are already the A operands of dV += P^T dO and dK += dS^T Q. dQ += dS K
// needs dS across all keys: dS^T goes through shared memory (read back with ldmatrix.trans) and the warps then
// split dQ_i into 16x16 blocks, so no cross-warp reduction is needed.
//
// GQA: the query heads of a group run in different blocks. With head_group > 1 each adds its scaled dK/dV into
// fp32 buffers (batch, heads_kv, seqlen_k, D) with atomics (the host op converts them; summation order of the
// group varies, last-bit differences in dk/dv); with head_group == 1 the block writes dk/dv itself.
#pragma once
#include <cuda_runtime.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../common/seqlen.h"
#include "../../sm80/ptx.h"
#include "../../sm80/smem_tile.h"
#include "../../sm80/warp_gemm.h"
#include "fwd_kernel.cuh"  // Fa1Schedule

namespace fae {

template <typename T_, int kHeadDim_>
struct Fa1BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 16;  // query rows per inner step (FA1's STEP, as the FA1 forward)
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  // dK + dV of 16 keys x D columns cost D floats per thread. D = 256 splits the columns over 2 warps sharing
  // 16 keys (both recompute S^T and dP^T), which halves the K/V tile to 64 keys.
  static constexpr int kDSplit = kHeadDim <= 128 ? 1 : 2;
  static constexpr int kKeyGroups = kWarps / kDSplit;
  static constexpr int kWarpKeys = 16;
  static constexpr int kBlockN = kKeyGroups * kWarpKeys;
  static constexpr int kQT = kBlockM / 8;  // 8-query column tiles of S^T
  static constexpr int kWarpD = kHeadDim / kDSplit;
  static constexpr int kWDT = kWarpD / 8;
  static constexpr int kDqUnits = (kBlockM / 16) * (kHeadDim / 16);  // 16x16 blocks of dQ_i, spread over warps
  static constexpr int kDqUnitsPerWarp = (kDqUnits + kWarps - 1) / kWarps;
  static constexpr int kRowThreads = kThreads / kBlockM;  // threads per row computing D_i
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  using DsTile = SmemTile<kBlockN, kBlockM>;  // dS^T: keys x queries
  // K, V, two stages of (Q, dO, O), dS^T, lse_log2 and D of the current step.
  static constexpr int kOffV = KVTile::kBytes;
  static constexpr int kOffRows = 2 * KVTile::kBytes;  // stage s: Q, dO, O at kOffRows + (3s + 0, 1, 2) * QTile
  static constexpr int kOffDs = kOffRows + 6 * QTile::kBytes;
  static constexpr int kOffLse = kOffDs + DsTile::kBytes;
  static constexpr int kOffDelta = kOffLse + kBlockM * 4;
  static constexpr int kSmemBytes = kOffDelta + kBlockM * 4;
  static_assert(kBlockM % 16 == 0 && kWarpD % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
  static_assert(kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0, "D_i rows within one warp");
  static_assert(kSmemBytes <= 163 * 1024, "must fit sm80's shared memory");
};


// Dot product of two registers of two 16-bit values each, in fp32.
template <typename T>
__device__ __forceinline__ float fa1_dot2(uint32_t a, uint32_t b) {
  const float2 x = unpack2<T>(a), y = unpack2<T>(b);
  return fmaf(x.x, y.x, x.y * y.y);
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fa1_bwd_kernel(const __grid_constant__ Fa1BwdParams p) {
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim, kThreads = Tr::kThreads;
  constexpr int kQT = Tr::kQT, kWDT = Tr::kWDT, kWarps = Tr::kWarps, kUPW = Tr::kDqUnitsPerWarp;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;
  using DsTile = typename Tr::DsTile;

  extern __shared__ __align__(16) char smem[];
  const uint32_t sK = smem_addr(smem), sV = sK + Tr::kOffV, sDs = sK + Tr::kOffDs;
  float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffLse);      // lse * log2(e); +inf: P = 0
  float* s_delta = reinterpret_cast<float*>(smem + Tr::kOffDelta);  // D_i - dlse_i

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kw0 = (warp % Tr::kKeyGroups) * Tr::kWarpKeys;  // this warp's first key within the K/V tile
  const int wd0 = (warp / Tr::kKeyGroups) * Tr::kWarpD;     // this warp's first dK/dV column
  const bool ds_writer = warp < Tr::kKeyGroups;             // one copy of dS^T: the column-split 0 warps
  const int drow = tid / Tr::kRowThreads, dsub = tid % Tr::kRowThreads;  // D_i phase: row, lane in row

  const int bh = blockIdx.x;
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.head_group;
  const SeqInfo seq = seq_info(p, b);
  const T* q = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h);
  const T* k = seq.k_side(static_cast<const T*>(p.k), p.k_batch_stride, p.k_head_stride, p.k_row_stride, hk);
  const T* v = seq.k_side(static_cast<const T*>(p.v), p.v_batch_stride, p.v_head_stride, p.v_row_stride, hk);
  const T* o = seq.q_side(static_cast<const T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, h);
  const T* dout = seq.q_side(static_cast<const T*>(p.dout), p.do_batch_stride, p.do_head_stride, p.do_row_stride, h);
  T* dq = seq.q_side(static_cast<T*>(p.dq), p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, h);
  const int64_t row_base = static_cast<int64_t>(bh) * p.seqlen_q;  // row buffers are (B*Hq, Sq, ...)
  float* dq_acc = p.dq_accum + row_base * kD;
  const float* lse = p.lse + row_base;
  const float* dlse = p.dlse != nullptr ? p.dlse + row_base : nullptr;
  const bool direct = p.dk_accum == nullptr;  // dk/dv written by this block (no GQA); else fp32 atomics
  T* dk = seq.k_side(static_cast<T*>(p.dk), p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, hk);
  T* dv = seq.k_side(static_cast<T*>(p.dv), p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, hk);
  const int64_t kv_acc_base = (static_cast<int64_t>(b) * p.heads_kv + hk) * p.seqlen_k * kD;

  const WindowMask mask = WindowMask::of(p, seq);
  const Fa1Schedule<kBlockM, kBlockN> sched{mask, (p.seqlen_q + kBlockM - 1) / kBlockM};
  const int num_k_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int j) {
    KVTile::template load_async<kThreads>(sK, k, p.k_row_stride, j * kBlockN, p.seqlen_k, tid);
    KVTile::template load_async<kThreads>(sV, v, p.v_row_stride, j * kBlockN, p.seqlen_k, tid);
  };
  auto load_rows = [&](int stage, int i) {  // Q_i, dO_i, O_i; rows past seqlen_q are zero-filled
    const uint32_t base = sK + Tr::kOffRows + 3 * stage * QTile::kBytes;
    QTile::template load_async<kThreads>(base, q, p.q_row_stride, i * kBlockM, p.seqlen_q, tid);
    QTile::template load_async<kThreads>(base + QTile::kBytes, dout, p.do_row_stride, i * kBlockM, p.seqlen_q, tid);
    QTile::template load_async<kThreads>(base + 2 * QTile::kBytes, o, p.o_row_stride, i * kBlockM, p.seqlen_q, tid);
  };
  // dK/dV rows of K/V tiles [t0, t1) that no query sees: zeros (direct mode; the GQA buffers start zeroed).
  auto zero_kv_tiles = [&](int t0, int t1) {
    const int r0 = t0 * kBlockN, r1 = min(t1 * kBlockN, p.seqlen_k);
    const int64_t chunks = static_cast<int64_t>(r1 - r0) * (kD / 8);  // 16-byte stores
    for (int64_t c = tid; c < chunks; c += kThreads) {
      const int r = r0 + static_cast<int>(c / (kD / 8)), col = static_cast<int>(c % (kD / 8)) * 8;
      *reinterpret_cast<uint4*>(dk + r * p.dk_row_stride + col) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dv + r * p.dv_row_stride + col) = make_uint4(0u, 0u, 0u, 0u);
    }
  };

  int j = -1, i = sched.num_q_tiles - 1, lo = 0;
  bool more = sched.next(j, i, lo);
  if (more) {
    load_kv(j);
    load_rows(0, i);
    cp_async_commit();
  }
  int stage = 0;
  int kv_unwritten = 0;  // direct mode: first K/V tile whose dK/dV rows are not written yet

  while (more) {  // outer loop: K/V tile j
    const int n0 = j * kBlockN;
    float acc_dk[kWDT][4], acc_dv[kWDT][4];
    zero_acc(acc_dk);
    zero_acc(acc_dv);

    int nj = j;
    do {  // inner loop: the query tiles i that see a key of tile j
      const int m0 = i * kBlockM;
      const bool first = j == sched.first_tile(i), last = j == sched.last_tile(i);
      int ni = i, nlo = lo;
      const bool has_next = sched.next(nj, ni, nlo);

      // Global loads whose latency hides behind the barrier and the matmuls: this step's lse (and dlse) of
      // the D_i row, and the old dQ_i values of this thread's dQ elements (written by this same thread at the
      // tile's previous visit, so program order makes them visible).
      float lse_row = -INFINITY, dlse_row = 0.f;
      if (dsub == 0 && m0 + drow < p.seqlen_q) {
        lse_row = lse[m0 + drow];
        if (dlse != nullptr) dlse_row = dlse[m0 + drow];
      }
      float2 dq_old[kUPW][2][2];  // [unit][8-column tile][row half]
#pragma unroll
      for (int u = 0; u < kUPW; ++u) {
        const int unit = warp + u * kWarps, mt = unit / (kD / 16), dc = unit % (kD / 16);
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int row = m0 + mt * 16 + g + hf * 8;
            dq_old[u][n][hf] = make_float2(0.f, 0.f);
            const int col = dc * 16 + n * 8 + 2 * t;
            if (!first && unit < Tr::kDqUnits && row < p.seqlen_q)
              dq_old[u][n][hf] = *reinterpret_cast<const float2*>(dq_acc + static_cast<int64_t>(row) * kD + col);
          }
      }

      cp_async_wait<0>();  // K/V (if new) and Q, dO, O of this step have landed
      __syncthreads();     // ... for every thread; every warp is done with the previous step (other stage, dS^T)
      if (has_next) {
        load_rows(stage ^ 1, ni);
        cp_async_commit();
      }
      const uint32_t sQ = sK + Tr::kOffRows + 3 * stage * QTile::kBytes;
      const uint32_t sdO = sQ + QTile::kBytes, sO = sQ + 2 * QTile::kBytes;

      // D_i = rowsum(dO_i * O_i) (minus dlse_i: d lse / d s = P folds into the same term), and lse in log2.
      {
        float sum = 0.f;
        const char* rdo = smem + (sdO - sK) + drow * QTile::kPitchBytes;
        const char* ro = smem + (sO - sK) + drow * QTile::kPitchBytes;
#pragma unroll
        for (int c = dsub; c < kD / 8; c += Tr::kRowThreads) {
          const uint4 dv4 = *reinterpret_cast<const uint4*>(rdo + c * 16);
          const uint4 ov4 = *reinterpret_cast<const uint4*>(ro + c * 16);
          sum += fa1_dot2<T>(dv4.x, ov4.x) + fa1_dot2<T>(dv4.y, ov4.y) + fa1_dot2<T>(dv4.z, ov4.z) +
                 fa1_dot2<T>(dv4.w, ov4.w);
        }
#pragma unroll
        for (int off = 1; off < Tr::kRowThreads; off *= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
        if (dsub == 0) {
          // Rows that see no key (lse -inf) and rows past the end get +inf, so P = exp2(s - inf) = 0, never NaN.
          s_lse[drow] = lse_row == -INFINITY ? INFINITY : lse_row * 1.44269504088896340736f;
          s_delta[drow] = sum - dlse_row;
        }
      }
      __syncthreads();

      // acc (this warp's 16 keys x kBlockM queries) = A-tile rows (keys) . B-tile rows (queries), k over D.
      auto keys_times_rows = [&](float (&acc)[kQT][4], uint32_t sA, uint32_t sB) {
        zero_acc(acc);
        gemm_abt<T, KVTile, QTile, kD>(one_mtile(acc), sA, kw0, sB, 0, lane);
      };
      // acc (16 keys x this warp's D columns) += A (keys x queries) . X (queries x D), X rows from shared memory.
      auto accumulate_kv = [&](float (&acc)[kWDT][4], const uint32_t (&a)[kBlockM / 16][4], uint32_t sX) {
        gemm_rb<T, QTile>(one_mtile(acc), one_mtile(a), sX, 0, wd0, lane);
      };

      // P^T = exp2(S^T * scale_log2 - lse_log2[query]); masked pairs (keys past the end included) are 0.
      float acc_s[kQT][4];
      keys_times_rows(acc_s, sK, sQ);
      const bool need_mask = !mask.tile_fully_visible(m0, m0 + kBlockM, n0 + kw0, n0 + kw0 + Tr::kWarpKeys);
#pragma unroll
      for (int qi = 0; qi < kQT; ++qi)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = qi * 8 + 2 * t + (e & 1);
          float pe = exp2_approx(fmaf(acc_s[qi][e], p.scale_log2, -s_lse[ql]));
          if (need_mask && !mask.visible(m0 + ql, n0 + kw0 + g + (e >= 2) * 8)) pe = 0.f;
          acc_s[qi][e] = pe;
        }
      uint32_t a_frag[kBlockM / 16][4];  // accumulator (keys x queries) -> A operands with k = queries
      pack_a_frags<T>(one_mtile(a_frag), one_mtile(acc_s));
      accumulate_kv(acc_dv, a_frag, sdO);  // dV_j += P^T dO_i

      // dS^T = P^T * (dP^T - D[query]) with dP^T = V_j dO_i^T; scale is applied to dK and dQ when written.
      float acc_dp[kQT][4];
      keys_times_rows(acc_dp, sV, sdO);
#pragma unroll
      for (int qi = 0; qi < kQT; ++qi)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[qi][e] = acc_s[qi][e] * (acc_dp[qi][e] - s_delta[qi * 8 + 2 * t + (e & 1)]);
      pack_a_frags<T>(one_mtile(a_frag), one_mtile(acc_dp));
      accumulate_kv(acc_dk, a_frag, sQ);  // dK_j += dS^T Q_i

      if (ds_writer) {  // the packed dS^T (same values as the dK operand) -> shared memory
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            // a[0]: (key g, query 2t) of query tile 2kk; a[1]: key g+8; a[2], a[3]: query tile 2kk+1.
            const int key = kw0 + g + (r & 1) * 8, col = (2 * kk + (r >> 1)) * 8 + 2 * t;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(DsTile::addr(sDs, key, col)), "r"(a_frag[kk][r]));
          }
      }
      __syncthreads();

      // dQ_i += dS K_j: this warp's 16x16 blocks of dQ_i over all kBlockN keys.
      float acc_dq[kUPW][2][4];
#pragma unroll
      for (int u = 0; u < kUPW; ++u) {
        const int unit = warp + u * kWarps, mt = unit / (kD / 16), dc = unit % (kD / 16);
        zero_acc(acc_dq[u]);
        if (unit < Tr::kDqUnits)  // warp-uniform
          gemm_atb<T, DsTile, KVTile, kBlockN>(one_mtile(acc_dq[u]), sDs, mt * 16, sK, dc * 16, lane);
      }

      // dQ_i back to global memory: fp32 accumulator, or, at the tile's last visit, dq = scale * dQ_i.
#pragma unroll
      for (int u = 0; u < kUPW; ++u) {
        const int unit = warp + u * kWarps, mt = unit / (kD / 16), dc = unit % (kD / 16);
        if (unit >= Tr::kDqUnits) continue;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int row = m0 + mt * 16 + g + hf * 8, col = dc * 16 + n * 8 + 2 * t;
            if (row >= p.seqlen_q) continue;
            const float x = acc_dq[u][n][2 * hf] + dq_old[u][n][hf].x;
            const float y = acc_dq[u][n][2 * hf + 1] + dq_old[u][n][hf].y;
            if (last) {
              *reinterpret_cast<uint32_t*>(dq + row * p.dq_row_stride + col) = pack2<T>(x * p.scale, y * p.scale);
            } else {
              *reinterpret_cast<float2*>(dq_acc + static_cast<int64_t>(row) * kD + col) = make_float2(x, y);
            }
          }
      }

      i = ni, lo = nlo, more = has_next, stage ^= 1;
    } while (more && nj == j);

    __syncthreads();  // every warp is done with K_j and V_j: fetch the next tile while dK_j, dV_j are written
    if (more) {
      load_kv(nj);
      cp_async_commit();
    }
    {  // dK_j = scale * dS^T Q, dV_j = P^T dO, summed over the visited query tiles
      if (direct) {
        zero_kv_tiles(kv_unwritten, j);
        kv_unwritten = j + 1;
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int key = n0 + kw0 + g + hf * 8;
        if (key < p.seqlen_k) {
#pragma unroll
          for (int di = 0; di < kWDT; ++di) {
            const int col = wd0 + di * 8 + 2 * t;
            const float k0 = acc_dk[di][2 * hf] * p.scale, k1 = acc_dk[di][2 * hf + 1] * p.scale;
            const float v0 = acc_dv[di][2 * hf], v1 = acc_dv[di][2 * hf + 1];
            if (direct) {
              *reinterpret_cast<uint32_t*>(dk + key * p.dk_row_stride + col) = pack2<T>(k0, k1);
              *reinterpret_cast<uint32_t*>(dv + key * p.dv_row_stride + col) = pack2<T>(v0, v1);
            } else {
              const int64_t off = kv_acc_base + static_cast<int64_t>(key) * kD + col;
              red_add_f32x2(p.dk_accum + off, k0, k1);
              red_add_f32x2(p.dv_accum + off, v0, v1);
            }
          }
        }
      }
    }
    j = nj;
  }
  cp_async_wait<0>();

  if (direct) zero_kv_tiles(kv_unwritten, num_k_tiles);
  // Query tiles whose rows see no key were never visited: dq = 0.
  for (int ie = 0; ie < sched.num_q_tiles; ++ie) {
    if (!sched.empty(ie)) continue;
    const int r0 = ie * kBlockM, rows = min(kBlockM, p.seqlen_q - r0);
    for (int c = tid; c < rows * (kD / 8); c += kThreads) {
      const int r = r0 + c / (kD / 8), col = (c % (kD / 8)) * 8;
      *reinterpret_cast<uint4*>(dq + r * p.dq_row_stride + col) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

}  // namespace fae
