// FlashAttention-2 backward, the two small memory-bound kernels around the main one.
//   preprocess: per query row, Delta = rowsum(dO * O) - dlse and lse_log2 = lse * log2(e) (+inf for rows that
//               see no key and for padding rows), and zero that row of dq_accum.
//   dq convert: dq = dq_accum * scale in the input dtype and q's layout.
#pragma once
#include <cuda_runtime.h>
#include <cmath>
#include "../../common/params.h"
#include "../../common/seqlen.h"
#include "../../sm80/ptx.h"

namespace fae {

constexpr int kBwdRowThreads = 8;        // threads per row in the preprocess kernel
constexpr int kBwdAuxBlockThreads = 128;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBwdAuxBlockThreads) fa2_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  const int sub = threadIdx.x % kBwdRowThreads;
  // Row i of (batch b, head h), i < seqlen_q_rounded (the longest sequence rounded up). Each sequence writes its
  // rows and its own padding rows up to a whole kBwdSeqRound tile at bwd_row0; a shorter varlen sequence's
  // remaining rows have no buffer row and exit.
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * (kBwdAuxBlockThreads / kBwdRowThreads) +
                       threadIdx.x / kBwdRowThreads;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_rounded;
  const bool in_grid = slot < total;  // the last block overshoots; its spare slots read sequence 0, write nothing
  const int64_t bh = in_grid ? slot / p.seqlen_q_rounded : 0;
  const int i = static_cast<int>(slot % p.seqlen_q_rounded);
  const int b = static_cast<int>(bh / p.heads_q), h = static_cast<int>(bh % p.heads_q);
  const SeqInfo seq = seq_info(p, b);
  const int own_rows = (seq.seqlen_q + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
  const bool in_buffer = in_grid && i < own_rows;
  const int64_t row = in_buffer ? bwd_row0(p, seq, h) + i : 0;
  const bool valid = in_buffer && i < seq.seqlen_q;

  float sum = 0.f;
  if (valid) {
    const T* o = seq.q_side(static_cast<const T*>(p.o),
                            p.o_batch_stride, p.o_head_stride, p.o_row_stride, h) + i * p.o_row_stride;
    const T* dout = seq.q_side(static_cast<const T*>(p.dout),
                               p.do_batch_stride, p.do_head_stride, p.do_row_stride, h) + i * p.do_row_stride;
#pragma unroll
    for (int c = sub; c < kChunks; c += kBwdRowThreads) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8);
      const uint4 dv = *reinterpret_cast<const uint4*>(dout + c * 8);
      const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
      const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = unpack2<T>(ow[j]), d = unpack2<T>(dw[j]);
        sum = fmaf(a.x, d.x, fmaf(a.y, d.y, sum));
      }
    }
  }
#pragma unroll
  for (int off = 1; off < kBwdRowThreads; off *= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  if (!in_buffer) return;

  if (sub == 0) {
    float delta = 0.f, lse2 = INFINITY;
    if (valid) {
      const int64_t r = lse_row0(p, seq, h) + i;
      const float lse = p.lse[r];
      delta = sum - (p.dlse != nullptr ? p.dlse[r] : 0.f);  // d lse / d s = P folds into Delta
      lse2 = lse == -INFINITY ? INFINITY : lse * 1.44269504088896340736f;
    }
    p.dsoftmax_sum[row] = delta;
    p.lse_log2[row] = lse2;
  }
  if (p.dq_accum != nullptr) {
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + row * kHeadDim);
#pragma unroll
    for (int c = sub; c < kHeadDim / 4; c += kBwdRowThreads) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBwdAuxBlockThreads) fa2_bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kChunks = kHeadDim / 8;  // 8 elements per thread: two float4 in, one 16-byte store out
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kBwdAuxBlockThreads + threadIdx.x;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;  // varlen: max_seqlen_q per (b, h)
  if (idx >= rows * kChunks) return;
  const int c = static_cast<int>(idx % kChunks) * 8;
  const int64_t row = idx / kChunks;
  const int64_t bh = row / p.seqlen_q;
  const int i = static_cast<int>(row % p.seqlen_q);
  const int b = static_cast<int>(bh / p.heads_q), h = static_cast<int>(bh % p.heads_q);
  const SeqInfo seq = seq_info(p, b);
  if (i >= seq.seqlen_q) return;
  const float* acc = p.dq_accum + (bwd_row0(p, seq, h) + i) * kHeadDim + c;
  const float4 x = *reinterpret_cast<const float4*>(acc);
  const float4 y = *reinterpret_cast<const float4*>(acc + 4);
  const float s = p.scale;
  uint4 out;
  out.x = pack2<T>(x.x * s, x.y * s);
  out.y = pack2<T>(x.z * s, x.w * s);
  out.z = pack2<T>(y.x * s, y.y * s);
  out.w = pack2<T>(y.z * s, y.w * s);
  T* dq = seq.q_side(static_cast<T*>(p.dq),
                     p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, h) + i * p.dq_row_stride + c;
  *reinterpret_cast<uint4*>(dq) = out;
}

}  // namespace fae
