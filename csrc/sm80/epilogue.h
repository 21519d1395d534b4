// Writing mma accumulators out, shared by the FA2, FA1 and decode kernels.
//
// The D fragment (ptx.h) gives each lane two adjacent columns of rows g and g + 8: stored straight to global
// memory that is a 4-byte store per lane and row. So outputs go through shared memory first: stage_acc puts the
// fragments (fp32 -> 16 bits) into a SmemTile, and, after a barrier, store_tile_rows writes whole 16-byte
// chunks of rows, coalesced. stage_acc_f32 keeps fp32 for partial results that warps merge in shared memory.
#pragma once
#include <cstdint>
#include "ptx.h"

namespace fae {

// acc (kMT m-tiles x kNT n-tiles) * scale(mi, half) -> 16-bit elements (row0 + 16 mi + g + 8 half,
// col0 + 8 ni + 2t ..) of a shared Tile; half 0 is row g, half 1 row g + 8. scale is inlined: a lambda
// returning a per-row factor, or a constant.
template <typename T, typename Tile, int kMT, int kNT, typename Scale>
__device__ __forceinline__ void stage_acc(uint32_t s, int row0, int col0, const float (&acc)[kMT][kNT][4], int lane,
                                          Scale scale) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float f = scale(mi, half);
      const int r = row0 + mi * 16 + g + half * 8;
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni) {
        const uint32_t packed = pack2<T>(acc[mi][ni][2 * half] * f, acc[mi][ni][2 * half + 1] * f);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(Tile::addr(s, r, col0 + ni * 8 + 2 * t)), "r"(packed));
      }
    }
}

// One m-tile's acc (kNT n-tiles) as fp32 into dst[(g + 8 half) * pitch + 8 ni + 2t ..] (pitch in floats).
template <int kNT>
__device__ __forceinline__ void stage_acc_f32(float* dst, int pitch, const float (&acc)[kNT][4], int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      *reinterpret_cast<float2*>(dst + (g + half * 8) * pitch + ni * 8 + 2 * t) =
          make_float2(acc[ni][2 * half], acc[ni][2 * half + 1]);
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// One output of store_tile_rows: the staged tile, the global matrix and its row stride. The stride is held by
// reference so a kernel parameter stays in parameter space: a copy would pin 2 registers per output for the
// whole store loop (spills in the D256 dK/dV kernel).
template <typename T>
struct TileOut {
  uint32_t smem;
  T* gmem;
  const int64_t& row_stride;
};

// Rows [row0, row0 + Tile rows) of each output's global (rows x D) matrix <- its staged Tile, in 16-byte
// chunks; rows at or past row_limit are skipped. All kThreads threads of the block take part (the mirror of
// SmemTile::load_async). Several outputs of the same rows (dK and dV) share one loop: its index and bound
// arithmetic is paid once.
template <int kThreads, typename Tile, typename... Outs>
__device__ __forceinline__ void store_tile_rows(int row0, int row_limit, int tid, const Outs&... outs) {
#pragma unroll
  for (int i = tid; i < Tile::kChunks; i += kThreads) {
    const int r = i / Tile::kChunksPerRow, c = (i % Tile::kChunksPerRow) * 8;
    if (row0 + r < row_limit) {
      uint4 val[sizeof...(Outs)];
      int j = 0;
      ((val[j++] = ld_shared_v4(Tile::addr(outs.smem, r, c))), ...);
      j = 0;
      ((*reinterpret_cast<uint4*>(outs.gmem + (row0 + r) * outs.row_stride + c) = val[j++]), ...);
    }
  }
}

}  // namespace fae
