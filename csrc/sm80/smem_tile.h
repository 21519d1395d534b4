// Shared-memory tiles of (rows x D) 16-bit elements. Rows are padded by 16 bytes so the 8 row addresses of
// one ldmatrix phase fall in 8 different 16-byte bank groups (row pitch = 4 banks mod 32): conflict-free
// without a swizzle, for every supported D.
#pragma once
#include <cstdint>
#include "ptx.h"

namespace fae {

template <int kRows, int kHeadDim>
struct SmemTile {
  static constexpr int kPitch = kHeadDim + 8;  // elements per row in shared memory
  static constexpr int kPitchBytes = kPitch * 2;
  static constexpr int kBytes = kRows * kPitchBytes;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static constexpr int kChunks = kRows * kChunksPerRow;

  // Asynchronously copy rows [row0, row0 + kRows) of a global (rows x D) matrix with the given row stride;
  // rows at or past row_limit are zero-filled. All kThreads threads of the block take part.
  template <int kThreads, typename T>
  __device__ __forceinline__ static void load_async(uint32_t smem, const T* gmem, int64_t row_stride, int row0,
                                                    int row_limit, int tid) {
    if constexpr (kThreads % kChunksPerRow == 0 && kChunks % kThreads == 0) {
      // Thread tid copies chunk (tid % C) of rows tid / C, tid / C + kRowStep, ...: one pointer, one stride.
      constexpr int kRowStep = kThreads / kChunksPerRow;
      const int r0 = tid / kChunksPerRow, c = (tid % kChunksPerRow) * 8;
      // Walk one pointer by a fixed step: precomputing every row's 64-bit offset would pin 2 registers a row.
      const T* src = gmem + (row0 + r0) * row_stride + c;
      const int64_t step = kRowStep * row_stride;
      const uint32_t dst = smem + r0 * kPitchBytes + c * 2;
#pragma unroll
      for (int i = 0; i < kChunks / kThreads; ++i, src += step) {
        const bool valid = row0 + r0 + i * kRowStep < row_limit;
        cp_async_16(dst + i * kRowStep * kPitchBytes, valid ? src : gmem, valid);
      }
    } else {  // head dims whose chunk count does not divide the thread count (96)
#pragma unroll
      for (int i = tid; i < kChunks; i += kThreads) {
        const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
        const bool valid = row0 + r < row_limit;
        cp_async_16(smem + r * kPitchBytes + c * 2, valid ? gmem + (row0 + r) * row_stride + c : gmem, valid);
      }
    }
  }

  // Byte address of element (r, c).
  __device__ __forceinline__ static uint32_t addr(uint32_t smem, int r, int c) {
    return smem + r * kPitchBytes + c * 2;
  }
};

}  // namespace fae
