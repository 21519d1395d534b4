// Host-side launch of the FA1 forward kernel for one (dtype, head dim).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "fwd_kernel.cuh"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_fwd(const Fa1FwdParams& params, cudaStream_t stream) {
  using Tr = Fa1FwdTraits<T, kHeadDim>;
  auto kernel = fa1_fwd_kernel<Tr>;
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string("flashattn_ext: ") + what + ": " + cudaGetErrorString(err));
  };
  // More than 48 KB of dynamic shared memory must be opted into, once per kernel.
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  check(attr_err, "cudaFuncSetAttribute(fa1_fwd)");
  // FA1's grid: one block per (batch, head); the whole sequence is walked inside the block.
  const int64_t blocks = static_cast<int64_t>(params.batch) * params.heads_q;
  if (blocks == 0 || params.seqlen_q == 0) return;
  if (blocks > 0x7fffffff) throw std::runtime_error("flashattn_ext: batch * heads exceeds the CUDA grid limit");
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  check(cudaGetLastError(), "fa1_fwd launch");
}

}  // namespace fae
