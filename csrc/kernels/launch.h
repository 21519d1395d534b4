// Host-side launch helpers shared by every kernel's launcher.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fae {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("flashattn_ext: ") + what + ": " + cudaGetErrorString(err));
}

inline unsigned grid_size(int64_t blocks, const char* what) {
  if (blocks > 0x7fffffff) throw std::runtime_error(std::string("flashattn_ext: ") + what + " grid exceeds the CUDA limit");
  return static_cast<unsigned>(blocks);
}

// Opt `kernel` into `bytes` of dynamic shared memory (needed above 48 KB). A device with less shared memory
// per block than the tile needs (e.g. large head dims on sm86/sm89, 99 KB) gets a clear error, not a failed
// launch. Called on every launch: it is a cheap attribute set, and the device may differ between calls.
template <typename Kernel>
void set_smem_limit(Kernel kernel, int bytes, const char* what) {
  int device = 0, limit = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (bytes > limit)
    throw std::runtime_error(std::string("flashattn_ext: ") + what + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block but this GPU allows " + std::to_string(limit) +
                             "; use a smaller head dim on this GPU");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
}

}  // namespace fae
