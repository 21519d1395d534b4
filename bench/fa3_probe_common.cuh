// Shared by the standalone Hopper probes (bench/fa3_probe.cu, bench/fa3_bwd_probe.cu): the CUDA error check,
// random bf16 inputs drawn on the device, and the naive fp32 forward both probes check against.
#pragma once
#include <cuda_bf16.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include "common/mask.h"

using bf16 = __nv_bfloat16;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(2); } } while (0)

__global__ void fill_random(bf16* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    const float u1 = ((h & 0xffff) + 1) / 65537.f, u2 = (h >> 16) / 65536.f;
    x[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2));
  }
}

// One block per (b, h, query row): scores in shared memory, fp32 everywhere. Contiguous (B, H, S, D).
__global__ void reference_attention(const bf16* q, const bf16* k, const bf16* v, float* o, float* lse, int Hq, int Hkv,
                                    int Sq, int Sk, int D, float scale, int left, int right) {
  extern __shared__ float sc[];
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const bf16* qr = q + ((int64_t(b) * Hq + h) * Sq + row) * D;
  const bf16* kb = k + (int64_t(b) * Hkv + hk) * Sk * D;
  const bf16* vb = v + (int64_t(b) * Hkv + hk) * Sk * D;
  const fae::WindowMask mask{Sq, Sk, left, right};
  for (int j = threadIdx.x; j < Sk; j += blockDim.x) {
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += __bfloat162float(qr[d]) * __bfloat162float(kb[int64_t(j) * D + d]);
    sc[j] = mask.visible(row, j) ? s * scale : -INFINITY;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int j = 0; j < Sk; ++j) mx = fmaxf(mx, sc[j]);
  float sum = 0.f;
  for (int j = 0; j < Sk; ++j) sum += mx == -INFINITY ? 0.f : expf(sc[j] - mx);
  float* orow = o + ((int64_t(b) * Hq + h) * Sq + row) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < Sk; ++j)
      if (sc[j] != -INFINITY) acc += expf(sc[j] - mx) * __bfloat162float(vb[int64_t(j) * D + d]);
    orow[d] = sum > 0.f ? acc / sum : 0.f;
  }
  if (threadIdx.x == 0) lse[(int64_t(b) * Hq + h) * Sq + row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}
