// Hopper backward: the layout of dq_accum when the dK/dV kernel adds dQ with bulk copies (Tr::kDqBulk), and
// the kernel that converts it to dq.
//
// Bulk: each consumer stages its dQ part (kBlockM = 64 query rows x kDqCols columns, fp32) in shared memory
// in accumulator-fragment order and one thread adds the whole part to dq_accum with one bulk reduce. For the
// shared-memory stores to be conflict-free 16-byte stores, the fragment order is kept in global memory too:
// within a 64-row tile of dq_accum (64 x D floats, contiguous), part `part` (columns [part * kDqCols, ...))
// starts at part * 64 * kDqCols, and thread tid = 32 warp + 4 g + t of the warpgroup keeps its accumulator
// floats 4j .. 4j + 3 (rows 16 warp + g (+ 8), columns 8j + 2t (+ 1)) at (128 j + tid) * 4. The convert kernel
// undoes the permutation. Without bulk, dq_accum is row-major (B, Hq, seqlen_q_rounded, D) as for FA2. Varlen:
// the 64-row tiles start at the sequence's padded rows (seqlen.h bwd_row0, a multiple of kBwdSeqRound).
#pragma once
#include <cuda_runtime.h>
#include "../fa2/bwd_preprocess.cuh"
#include "../../common/params.h"
#include "../../sm80/ptx.h"
#include "seq.cuh"

namespace fae::fa3 {

// Offset (floats) of accumulator float 4j of warpgroup thread tid inside its part.
__device__ __forceinline__ int dq_frag_offset(int j, int tid) { return (128 * j + tid) * 4; }

// dq = dq_accum * scale in q's dtype and layout, 8 columns per thread (two float2 pairs per 4 columns).
template <typename Tr, bool kVarlen>
__global__ void __launch_bounds__(kBwdAuxBlockThreads) fa3_bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kChunks = kD / 8, kCols = Tr::kDqCols;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kBwdAuxBlockThreads + threadIdx.x;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;  // varlen: max_seqlen_q per (b, h)
  if (idx >= rows * kChunks) return;
  const int c = static_cast<int>(idx % kChunks) * 8;
  const int64_t row = idx / kChunks;
  const int64_t bh = row / p.seqlen_q;
  const int i = static_cast<int>(row % p.seqlen_q);
  const int b = static_cast<int>(bh / p.heads_q), h = static_cast<int>(bh % p.heads_q);
  const SeqInfo seq = sequence<kVarlen>(p, b);
  if (kVarlen && i >= seq.seqlen_q) return;  // rows past a shorter sequence's end
  // Row i is row rr = 16 warp + 8 r + g of its tile; columns c .. c + 7 are block j of part c / kCols, held by
  // the threads t = 0..3 of that (warp, g) as floats 2r, 2r + 1 of their group j.
  const int rr = i % 64, warp = rr / 16, r = (rr % 16) / 8, g = rr % 8;
  const float* src = p.dq_accum + (bwd_row0(p, seq, h) + (i - rr)) * kD + (c / kCols) * 64 * kCols +
                     dq_frag_offset((c % kCols) / 8, 32 * warp + 4 * g) + 2 * r;
  const float s = p.scale;
  uint32_t out[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const float2 x = *reinterpret_cast<const float2*>(src + 4 * t);
    out[t] = pack2<T>(x.x * s, x.y * s);
  }
  T* dq = seq.q_side(static_cast<T*>(p.dq), p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, h) +
          static_cast<int64_t>(i) * p.dq_row_stride + c;
  *reinterpret_cast<uint4*>(dq) = make_uint4(out[0], out[1], out[2], out[3]);
}

}  // namespace fae::fa3
