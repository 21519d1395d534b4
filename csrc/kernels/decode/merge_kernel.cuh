// merge_states: (o_a, lse_a) over key set A and (o_b, lse_b) over a disjoint set B -> (o, lse) over A u B, with
// the same SoftmaxState::merge the split-KV combine uses. One warp per (batch, head, row); lanes stride over D.
// A side whose lse is -inf (it saw no key) gets weight 0 and its o is not read, so the result never has NaN
// from it; both -inf gives o = 0, lse = -inf.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "../../common/params.h"
#include "../../common/softmax.h"

namespace fae {

__device__ __forceinline__ float merge_to_float(float x) { return x; }
__device__ __forceinline__ float merge_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float merge_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T merge_from_float(float x);
template <>
__device__ __forceinline__ float merge_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half merge_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 merge_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void merge_states_kernel(const __grid_constant__ MergeStatesParams p) {
  constexpr int kRowsPerBlock = 4;  // 128 threads
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int s = static_cast<int>(row % p.seqlen);
  const int64_t bh = row / p.seqlen;
  const int h = static_cast<int>(bh % p.heads), b = static_cast<int>(bh / p.heads);
  const float la = p.lse_a[b * p.la_stride[0] + h * p.la_stride[1] + s * p.la_stride[2]];
  const float lb = p.lse_b[b * p.lb_stride[0] + h * p.lb_stride[1] + s * p.lb_stride[2]];
  SoftmaxState st = SoftmaxState::from_lse(la);
  float fa, fb;
  st.merge(SoftmaxState::from_lse(lb), fa, fb);
  const float inv = st.inv_sum();
  const T* oa = static_cast<const T*>(p.o_a) + b * p.oa_stride[0] + h * p.oa_stride[1] + s * p.oa_stride[2];
  const T* ob = static_cast<const T*>(p.o_b) + b * p.ob_stride[0] + h * p.ob_stride[1] + s * p.ob_stride[2];
  T* o = static_cast<T*>(p.o) + row * p.head_dim;
  for (int d = lane; d < p.head_dim; d += 32) {
    float acc = 0.f;
    if (fa != 0.f) acc += merge_to_float(oa[d * p.oa_stride[3]]) * fa;
    if (fb != 0.f) acc += merge_to_float(ob[d * p.ob_stride[3]]) * fb;
    o[d] = merge_from_float<T>(acc * inv);
  }
  if (lane == 0) p.lse[row] = st.lse();
}

template <typename T>
void run_merge_states(const MergeStatesParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  if (rows == 0) return;
  const int64_t blocks = (rows + 3) / 4;
  if (blocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: merge_states: too many rows for one grid");
  merge_states_kernel<T><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("flashattn_ext: merge_states launch: ") + cudaGetErrorString(err));
}

}  // namespace fae
