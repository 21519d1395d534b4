// Host-side launch of the FA2 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "fwd_kernel.cuh"

namespace fae {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("flashattn_ext: ") + what + ": " + cudaGetErrorString(err));
}

template <typename T, int kHeadDim>
void run_fa2_fwd(const FwdParams& params, cudaStream_t stream) {
  using Tr = Fa2FwdTraits<T, kHeadDim>;
  auto kernel = fa2_fwd_kernel<Tr>;
  // More than 48 KB of dynamic shared memory must be opted into, once per kernel.
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  check_cuda(attr_err, "cudaFuncSetAttribute(fa2_fwd)");
  const int64_t num_m_blocks = (params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t blocks = num_m_blocks * params.batch * params.heads_q;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: batch * heads * query tiles exceeds the CUDA grid limit");
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "fa2_fwd launch");
}

}  // namespace fae
