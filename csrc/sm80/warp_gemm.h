// Warp-level GEMM loops on mma.sync m16n8k16, shared by the FA2, FA1 and decode kernels.
//
// A warp accumulates acc[kMT][kNT][4]: kMT 16-row m-tiles by kNT 8-column n-tiles in the mma D fragment layout
// (ptx.h). Operands come from SmemTile tiles through ldmatrix, or, for A, from registers (an accumulator packed
// to 16 bits: P of P V, dS of dS K). Four storage forms cover every product in the kernels:
//   gemm_abt  A (rows = m, cols = k) . B^T, B stored rows = n, cols = k    S = Q K^T, dP = dO V^T, S^T = K Q^T
//   gemm_atb  A stored transposed (rows = k, cols = m) . B (rows = k)       dQ = dS K from a stored dS^T
//   gemm_rbt  A from registers . B^T                                        decode's S = Q K^T, Q kept in registers
//   gemm_rb   A from registers . B (rows = k, cols = n)                     O += P V, dV += P^T dO, dK += dS^T Q
// Sizes are template arguments and every loop is unrolled, so each call compiles to the same straight-line
// ldmatrix/mma sequence as a loop written in place; one ldmatrix_x4 of B feeds two n-tiles (kNT is even).
#pragma once
#include <cstdint>
#include "ptx.h"

namespace fae {

// ---- accumulators -------------------------------------------------------------------------------------------

template <int kMT, int kNT>
__device__ __forceinline__ void zero_acc(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
}

// A warp that owns a single m-tile keeps [kNT][4] arrays; this views one as the [1][kNT][4] the loops take
// (same registers: after inlining the cast is free).
template <typename E, int kN>
__device__ __forceinline__ E (&one_mtile(E (&x)[kN][4]))[1][kN][4] {
  return *reinterpret_cast<E(*)[1][kN][4]>(&x);
}
template <int kNT>
__device__ __forceinline__ void zero_acc(float (&acc)[kNT][4]) {
  zero_acc(one_mtile(acc));
}

// The accumulators of two adjacent 8-column n-tiles (lo, hi) are exactly the A fragment of one k16 step with
// k = those 16 columns: pack them to 16 bits (P of P V, P^T / dS^T of the backward products).
template <typename T>
__device__ __forceinline__ void pack_a_frag(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}
template <typename T, int kMT, int kNT>
__device__ __forceinline__ void pack_a_frags(uint32_t (&a)[kMT][kNT / 2][4], const float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) pack_a_frag<T>(a[mi][kk], acc[mi][2 * kk], acc[mi][2 * kk + 1]);
}

// ---- fragments from shared memory (lane roles: ptx.h) -------------------------------------------------------

// A of m rows [row0, row0 + 16) and k columns [k0, k0 + 16) of a tile stored rows = m.
template <typename Tile>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t s, int row0, int k0, int lane) {
  ldmatrix_x4(a, Tile::addr(s, row0 + (lane & 15), k0 + (lane >> 4) * 8));
}
// The same A from a tile stored transposed (rows = k, cols = m).
template <typename Tile>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], uint32_t s, int k0, int row0, int lane) {
  ldmatrix_x4_trans(a, Tile::addr(s, k0 + (lane & 7) + (lane >> 4) * 8, row0 + ((lane >> 3) & 1) * 8));
}
// b0, b1 of n-tiles [n0, n0 + 8) (b[0], b[1]) and [n0 + 8, n0 + 16) (b[2], b[3]) for k in [k0, k0 + 16), from a
// tile stored rows = n (the B^T of A B^T).
template <typename Tile>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], uint32_t s, int n0, int k0, int lane) {
  ldmatrix_x4(b, Tile::addr(s, n0 + (lane & 7) + ((lane >> 4) << 3), k0 + ((lane >> 3) & 1) * 8));
}
// The same b0, b1 pairs from a tile stored rows = k (the B of A B).
template <typename Tile>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], uint32_t s, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, Tile::addr(s, k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8));
}

// B fragments from a tile stored rows = k (kKMajor) or rows = n, for n-tiles [n0, n0 + 16) and k [k0, k0 + 16).
template <bool kKMajor, typename Tile>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], uint32_t s, int n0, int k0, int lane) {
  if constexpr (kKMajor) {
    load_b_kn<Tile>(b, s, k0, n0, lane);
  } else {
    load_b_nk<Tile>(b, s, n0, k0, lane);
  }
}

// acc[mi][2np], acc[mi][2np + 1] += a[mi][kk] . (the two n-tiles of b), for every m-tile.
template <typename T, int kMT, int kNT, int kKSteps>
__device__ __forceinline__ void mma_b_pair(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKSteps][4], int kk,
                                           int np, const uint32_t (&b)[4]) {
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    mma_16816<T>(acc[mi][2 * np], a[mi][kk], b[0], b[1]);
    mma_16816<T>(acc[mi][2 * np + 1], a[mi][kk], b[2], b[3]);
  }
}

// ---- the loops ----------------------------------------------------------------------------------------------

// Both operands from shared memory, k over [0, kK): A = m columns/rows from a0 of TileA (stored rows = k when
// kAKMajor), B = n rows/columns from b0 of TileB (stored rows = k when kBKMajor). The A fragments of a k step
// are loaded once and reused for every n pair.
template <typename T, typename TileA, typename TileB, int kK, bool kAKMajor, bool kBKMajor, int kMT, int kNT>
__device__ __forceinline__ void gemm_smem(float (&acc)[kMT][kNT][4], uint32_t sA, int a0, uint32_t sB, int b0,
                                          int lane) {
  static_assert(kK % 16 == 0 && kNT % 2 == 0, "k16 steps, n-tile pairs");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMT][1][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
      if constexpr (kAKMajor) {
        load_a_trans<TileA>(a[mi][0], sA, kk * 16, a0 + mi * 16, lane);
      } else {
        load_a<TileA>(a[mi][0], sA, a0 + mi * 16, kk * 16, lane);
      }
    }
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      load_b<kBKMajor, TileB>(b, sB, b0 + np * 16, kk * 16, lane);
      mma_b_pair<T>(acc, a, 0, np, b);
    }
  }
}

// A from registers (a[mi][kk]: the fragment of k step kk, k = k0 + 16 kk ..), B = n columns/rows from n0 of
// TileB (stored rows = k when kBKMajor).
template <typename T, typename TileB, bool kBKMajor, int kMT, int kNT, int kKSteps>
__device__ __forceinline__ void gemm_reg(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKSteps][4],
                                         uint32_t sB, int n0, int k0, int lane) {
  static_assert(kNT % 2 == 0, "n-tile pairs");
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      load_b<kBKMajor, TileB>(b, sB, n0 + np * 16, k0 + kk * 16, lane);
      mma_b_pair<T>(acc, a, kk, np, b);
    }
}

// ---- the four products --------------------------------------------------------------------------------------

// acc += A B^T: A = m rows [a_row0, a_row0 + 16 kMT) of TileA, B = n rows [b_row0, b_row0 + 8 kNT) of TileB.
template <typename T, typename TileA, typename TileB, int kK, int kMT, int kNT>
__device__ __forceinline__ void gemm_abt(float (&acc)[kMT][kNT][4], uint32_t sA, int a_row0, uint32_t sB,
                                         int b_row0, int lane) {
  gemm_smem<T, TileA, TileB, kK, false, false>(acc, sA, a_row0, sB, b_row0, lane);
}
// acc += A B: A = columns [a_col0, a_col0 + 16 kMT) of TileA stored transposed (rows = k), B = columns
// [b_col0, b_col0 + 8 kNT) of TileB (rows = k), k over rows [0, kK) of both.
template <typename T, typename TileA, typename TileB, int kK, int kMT, int kNT>
__device__ __forceinline__ void gemm_atb(float (&acc)[kMT][kNT][4], uint32_t sA, int a_col0, uint32_t sB,
                                         int b_col0, int lane) {
  gemm_smem<T, TileA, TileB, kK, true, true>(acc, sA, a_col0, sB, b_col0, lane);
}
// acc += A B^T with A in registers and B = n rows [b_row0, b_row0 + 8 kNT) of TileB.
template <typename T, typename TileB, int kMT, int kNT, int kKSteps>
__device__ __forceinline__ void gemm_rbt(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKSteps][4],
                                         uint32_t sB, int b_row0, int lane) {
  gemm_reg<T, TileB, false>(acc, a, sB, b_row0, 0, lane);
}
// acc += A B with A in registers (k rows [k_row0, k_row0 + 16 kKSteps)) and B = columns [b_col0, ...) of TileB,
// stored rows = k.
template <typename T, typename TileB, int kMT, int kNT, int kKSteps>
__device__ __forceinline__ void gemm_rb(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKSteps][4],
                                        uint32_t sB, int k_row0, int b_col0, int lane) {
  gemm_reg<T, TileB, true>(acc, a, sB, b_col0, k_row0, lane);
}

}  // namespace fae
