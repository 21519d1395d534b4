// FlashAttention-1 forward (Dao et al. 2022, Algorithm 1), kept on the same tensor-core primitives as FA2
// (mma.sync m16n8k16, ldmatrix, cp.async) so a comparison isolates the algorithm:
//
// * one block per (batch, head); the K/V loop is the OUTER loop, the loop over query tiles the inner one;
// * O, m and l live in global memory (fp32 workspaces) and are read, rescaled and written back at every
//   (K/V tile, query tile) step; O is renormalised by 1/l at every step, as in the paper;
// * the 4 warps split the KEYS of a K/V tile (split-K): each computes S and P V for all 16 query rows against
//   its own keys, so row max, row sum and the partial outputs must be combined through shared memory.
//
// FA2 removes all three: it parallelises over query tiles, keeps O/m/l in registers with one normalisation
// at the end, and splits rows (not keys) across warps, so no cross-warp reduction is needed.
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

namespace fae {

// Keys per K/V tile, as FA1's kernel traits (256 for small head dims, 128 up to D=128). D=256, which FA1
// did not support, gets 64 so K, V and the fp32 reduction buffers fit sm80's 163 KB of shared memory.
constexpr int fa1_fwd_block_n(int head_dim) { return head_dim <= 64 ? 256 : head_dim <= 128 ? 128 : 64; }

template <typename T_, int kHeadDim_>
struct Fa1FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 16;  // query rows per inner step (FA1's STEP)
  static constexpr int kBlockN = fa1_fwd_block_n(kHeadDim);
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpKeys = kBlockN / kWarps;  // keys of one warp (split-K)
  static constexpr int kNTiles = kWarpKeys / 8;       // 8-key mma tiles of this warp's S
  static constexpr int kDTiles = kHeadDim / 8;        // 8-column mma tiles of O
  // Combine phase: 8 threads per query row, each owning kChunks float4 column chunks (interleaved, so the 8
  // threads of a row touch 128 contiguous bytes per chunk).
  static constexpr int kRowThreads = kThreads / kBlockM;
  static constexpr int kChunks = kHeadDim / 4 / kRowThreads;
  // Partial-O rows padded by 8 floats: the fragment stores of 8 rows then spread over all 32 banks.
  static constexpr int kRedPitch = kHeadDim + 8;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  // Shared memory: K, V, Q, per-warp partial O (fp32), old O (fp32), per-warp row max and row sum.
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + KVTile::kBytes;
  static constexpr int kOffQ = kOffV + KVTile::kBytes;
  static constexpr int kOffRed = kOffQ + QTile::kBytes;
  static constexpr int kOffO = kOffRed + kWarps * kBlockM * kRedPitch * 4;
  static constexpr int kOffMax = kOffO + kBlockM * kHeadDim * 4;
  static constexpr int kOffSum = kOffMax + kWarps * kBlockM * 4;
  static constexpr int kSmemBytes = kOffSum + kWarps * kBlockM * 4;
  static_assert(kWarpKeys % 16 == 0 && kHeadDim % 32 == 0, "tile shape");
  static_assert(kThreads == kBlockM * 8 && kChunks >= 1, "combine mapping: 8 threads per query row");
  static_assert(kSmemBytes <= 163 * 1024, "must fit sm80's shared memory");
};

// Which (K/V tile j, query tile i) pairs the block visits, in FA1's order: for each j, the run of query tiles
// whose rows can see a key of tile j. A query tile's visible keys are [key_begin(row0), key_end(row1)), so it
// visits the contiguous K/V tiles first_tile(i)..last_tile(i); both ends grow with i, hence each j's run of
// query tiles is contiguous and starts no lower than the previous j's. Query tiles with no visible key are
// "empty" and never visited (causal with Sq > Sk, windows): they are written as zeros at the end.
template <int kBlockM, int kBlockN>
struct Fa1Schedule {
  WindowMask mask;
  int num_q_tiles;

  __host__ __device__ __forceinline__ int row0(int i) const { return i * kBlockM; }
  __host__ __device__ __forceinline__ int row1(int i) const { return min(i * kBlockM + kBlockM, mask.seqlen_q); }
  __host__ __device__ __forceinline__ bool empty(int i) const { return mask.key_end(row1(i)) <= mask.key_begin(row0(i)); }
  __host__ __device__ __forceinline__ int first_tile(int i) const { return mask.key_begin(row0(i)) / kBlockN; }
  __host__ __device__ __forceinline__ int last_tile(int i) const { return (mask.key_end(row1(i)) - 1) / kBlockN; }
  __host__ __device__ __forceinline__ bool visits(int i, int j) const {
    return !empty(i) && first_tile(i) <= j && j <= last_tile(i);
  }

  // Advance (j, i) to the next visited pair; lo is the lowest query tile that may still visit anything.
  // Start from j = -1, i = num_q_tiles - 1, lo = 0. Returns false when every pair has been visited.
  __host__ __device__ __forceinline__ bool next(int& j, int& i, int& lo) const {
    if (i + 1 < num_q_tiles && visits(i + 1, j)) {
      ++i;
      return true;
    }
    while (lo < num_q_tiles && (empty(lo) || last_tile(lo) <= j)) ++lo;
    if (lo == num_q_tiles) return false;
    j = max(j + 1, first_tile(lo));  // jumps over K/V tiles no query row can see
    i = lo;
    return true;
  }
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fa1_fwd_kernel(const __grid_constant__ Fa1FwdParams p) {
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim, kThreads = Tr::kThreads;
  constexpr int kNT = Tr::kNTiles, kDT = Tr::kDTiles, kWarpKeys = Tr::kWarpKeys, kWarps = Tr::kWarps;
  constexpr int kChunks = Tr::kChunks, kRedPitch = Tr::kRedPitch;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;

  extern __shared__ __align__(16) char smem[];
  const uint32_t sK = smem_addr(smem + Tr::kOffK), sV = smem_addr(smem + Tr::kOffV);
  const uint32_t sQ = smem_addr(smem + Tr::kOffQ), sO = smem_addr(smem + Tr::kOffO);
  float* red = reinterpret_cast<float*>(smem + Tr::kOffRed);       // [warp][row][kRedPitch]
  const float* o_old = reinterpret_cast<const float*>(smem + Tr::kOffO);  // [row][kD]
  float* s_max = reinterpret_cast<float*>(smem + Tr::kOffMax);     // [warp][row], log2 domain
  float* s_sum = reinterpret_cast<float*>(smem + Tr::kOffSum);     // [warp][row]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kw0 = warp * kWarpKeys;  // this warp's first key within the K/V tile
  const int cr = tid / Tr::kRowThreads, cc = tid % Tr::kRowThreads;  // combine phase: row, first chunk

  const int bh = blockIdx.x;
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.head_group;
  const SeqInfo seq = seq_info(p, b);
  const T* q = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h);
  const T* k = seq.k_side(static_cast<const T*>(p.k), p.k_batch_stride, p.k_head_stride, p.k_row_stride, hk);
  const T* v = seq.k_side(static_cast<const T*>(p.v), p.v_batch_stride, p.v_head_stride, p.v_row_stride, hk);
  T* o = seq.q_side(static_cast<T*>(p.o), p.o_batch_stride, p.o_head_stride, p.o_row_stride, h);
  const int64_t ws_row0 = static_cast<int64_t>(bh) * p.seqlen_q;  // workspaces and lse are (B*Hq, Sq, ...)
  float* o_acc = p.o_acc + ws_row0 * kD;
  float* m_ws = p.m + ws_row0;
  float* l_ws = p.l + ws_row0;
  float* lse = p.lse + ws_row0;

  const WindowMask mask = WindowMask::of(p, seq);
  const Fa1Schedule<kBlockM, kBlockN> sched{mask, (p.seqlen_q + kBlockM - 1) / kBlockM};

  auto load_q = [&](int i) { QTile::template load_async<kThreads>(sQ, q, p.q_row_stride, i * kBlockM, p.seqlen_q, tid); };
  auto load_kv = [&](int j) {
    KVTile::template load_async<kThreads>(sK, k, p.k_row_stride, j * kBlockN, p.seqlen_k, tid);
    KVTile::template load_async<kThreads>(sV, v, p.v_row_stride, j * kBlockN, p.seqlen_k, tid);
  };
  // Old O of query tile i, unless K/V tile j is its first. Each thread fetches exactly the chunks it reads
  // in the combine phase, so a cp.async wait (no barrier) makes them visible.
  auto load_o = [&](int i, int j) {
    const int row = i * kBlockM + cr;
    if (j == sched.first_tile(i) || row >= p.seqlen_q) return;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = (cc + c * Tr::kRowThreads) * 4;
      cp_async_16(sO + (cr * kD + col) * 4, o_acc + static_cast<int64_t>(row) * kD + col, true);
    }
  };

  // cp.async groups are committed three per step, always in the order (Q, K+V, old O) of the NEXT step,
  // empty when there is nothing to fetch, so the wait counts below are constants.
  int j = -1, i = sched.num_q_tiles - 1, lo = 0;
  bool more = sched.next(j, i, lo);
  if (more) {
    load_q(i);
    cp_async_commit();
    load_kv(j);
    cp_async_commit();
    load_o(i, j);
    cp_async_commit();
  }

  while (more) {
    const int r0 = i * kBlockM, n0 = j * kBlockN;
    const bool first = j == sched.first_tile(i), last = j == sched.last_tile(i);
    int nj = j, ni = i, nlo = lo;
    const bool has_next = sched.next(nj, ni, nlo);
    const int crow = r0 + cr;
    const bool crow_valid = crow < p.seqlen_q;

    // Old (m, l) of the combine row: loaded now, used after the matmuls. One thread per row loads and later
    // stores them, so the global round trip stays within one thread.
    SoftmaxState st;
    st.init();
    if (!first && cc == 0 && crow_valid) {
      st.m = m_ws[crow];
      st.l = l_ws[crow];
    }

    cp_async_wait<1>();  // Q, K, V of this step have landed (old O may still be in flight)
    __syncthreads();     // ... for every thread; and the previous step's combine is done with s_max / s_sum

    // S = Q K^T for all 16 rows against this warp's keys.
    float acc_s[kNT][4];
    zero_acc(acc_s);
    gemm_abt<T, QTile, KVTile, kD>(one_mtile(acc_s), sQ, 0, sK, kw0, lane);
    if (!mask.tile_fully_visible(r0, r0 + kBlockM, n0 + kw0, n0 + kw0 + kWarpKeys)) {
#pragma unroll
      for (int ni_ = 0; ni_ < kNT; ++ni_)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!mask.visible(r0 + g + (e >= 2) * 8, n0 + kw0 + ni_ * 8 + 2 * t + (e & 1))) acc_s[ni_][e] = -INFINITY;
        }
    }

    // Row max over this warp's keys -> shared memory; the tile's row max m~ needs every warp's.
    float mx[2] = {-INFINITY, -INFINITY};  // rows g, g + 8
#pragma unroll
    for (int ni_ = 0; ni_ < kNT; ++ni_)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], acc_s[ni_][e]);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffff, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffff, mx[hf], 2));
      if (t == 0) s_max[warp * kBlockM + g + hf * 8] = mx[hf] * p.scale_log2;
    }
    __syncthreads();  // all partial maxima written; every warp is done reading Q
    if (has_next) load_q(ni);
    cp_async_commit();

    // P~ = exp2(S - m~) with the tile's row max, and this warp's part of the row sum l~.
    float offset[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      SoftmaxState tile;
      tile.init();
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tile.m = fmaxf(tile.m, s_max[w * kBlockM + g + hf * 8]);
      offset[hf] = tile.exp_offset();
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int ni_ = 0; ni_ < kNT; ++ni_)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2_approx(fmaf(acc_s[ni_][e], p.scale_log2, -offset[e >> 1]));
        acc_s[ni_][e] = pe;
        sum[e >> 1] += pe;
      }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      sum[hf] += __shfl_xor_sync(0xffffffff, sum[hf], 1);
      sum[hf] += __shfl_xor_sync(0xffffffff, sum[hf], 2);
      if (t == 0) s_sum[warp * kBlockM + g + hf * 8] = sum[hf];
    }

    // Partial P~ V over this warp's keys (S accumulators of two key tiles = A operand of one k16 step).
    float acc_o[kDT][4];
    zero_acc(acc_o);
    uint32_t pa[1][kWarpKeys / 16][4];
    pack_a_frags<T>(pa, one_mtile(acc_s));
    gemm_rb<T, KVTile>(one_mtile(acc_o), pa, sV, kw0, 0, lane);
    stage_acc_f32(red + warp * kBlockM * kRedPitch, kRedPitch, acc_o, lane);
    __syncthreads();  // partial sums and partial O of every warp are in shared memory; K and V are free
    if (has_next && nj != j) load_kv(nj);
    cp_async_commit();

    // Combine: the tile's (m~, l~) merges into the row's (m, l) exactly as the paper's update, and
    // O = diag(l_new)^-1 (diag(l) e^(m - m_new) O + e^(m~ - m_new) P~ V) is written back (normalised).
    st.m = __shfl_sync(0xffffffff, st.m, lane & ~(Tr::kRowThreads - 1));
    st.l = __shfl_sync(0xffffffff, st.l, lane & ~(Tr::kRowThreads - 1));
    SoftmaxState tile;
    tile.init();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      tile.m = fmaxf(tile.m, s_max[w * kBlockM + cr]);
      tile.l += s_sum[w * kBlockM + cr];
    }
    const float l_prev = st.l;
    float f_old, f_new;
    st.merge(tile, f_old, f_new);
    const float inv = st.inv_sum();
    const float a_old = l_prev * f_old * inv, a_new = f_new * inv;
    cp_async_wait<2>();  // this thread's old-O chunks have landed (next Q and K/V may still be in flight)
    if (crow_valid) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int col = (cc + c * Tr::kRowThreads) * 4;
        float4 pv = *reinterpret_cast<const float4*>(red + cr * kRedPitch + col);
#pragma unroll
        for (int w = 1; w < kWarps; ++w) {
          const float4 x = *reinterpret_cast<const float4*>(red + (w * kBlockM + cr) * kRedPitch + col);
          pv.x += x.x, pv.y += x.y, pv.z += x.z, pv.w += x.w;
        }
        float4 r = make_float4(pv.x * a_new, pv.y * a_new, pv.z * a_new, pv.w * a_new);
        if (!first) {  // on a first visit the buffer holds stale data (possibly NaN): never read it
          const float4 old = *reinterpret_cast<const float4*>(o_old + cr * kD + col);
          r.x += old.x * a_old, r.y += old.y * a_old, r.z += old.z * a_old, r.w += old.w * a_old;
        }
        if (last) {
          uint2 packed;
          packed.x = pack2<T>(r.x, r.y);
          packed.y = pack2<T>(r.z, r.w);
          *reinterpret_cast<uint2*>(o + crow * p.o_row_stride + col) = packed;
        } else {
          *reinterpret_cast<float4*>(o_acc + static_cast<int64_t>(crow) * kD + col) = r;
        }
      }
      if (cc == 0) {
        if (last) {
          lse[crow] = st.lse();
        } else {
          m_ws[crow] = st.m;
          l_ws[crow] = st.l;
        }
      }
    }
    if (has_next) load_o(ni, nj);  // after this thread's reads of the buffer above
    cp_async_commit();

    j = nj, i = ni, lo = nlo, more = has_next;
  }
  cp_async_wait<0>();

  // Query tiles whose rows see no key at all were never visited: output 0, lse -inf.
  for (int ie = 0; ie < sched.num_q_tiles; ++ie) {
    const int row = ie * kBlockM + cr;
    if (!sched.empty(ie) || row >= p.seqlen_q) continue;
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
      *reinterpret_cast<uint2*>(o + row * p.o_row_stride + (cc + c * Tr::kRowThreads) * 4) = make_uint2(0u, 0u);
    if (cc == 0) lse[row] = -INFINITY;
  }
}

}  // namespace fae
