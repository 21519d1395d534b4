// Host-side launch helpers shared by every kernel's launcher.
#pragma once
#include <cuda_runtime.h>
#include <atomic>
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
// launch. Launchers call it through set_smem_limit_once (below).
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

// set_smem_limit once per (kernel, device): the attribute queries and cudaFuncSetAttribute would otherwise cost host
// time on every call. One bit per device index (< 64; others are configured on every launch), set after success.
template <auto Kernel>
void set_smem_limit_once(int bytes, const char* what) {
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) return;
  set_smem_limit(Kernel, bytes, what);
  configured.fetch_or(bit, std::memory_order_acq_rel);
}

// The one way a launcher starts a kernel: nothing for an empty grid, the grid size checked, dynamic shared memory
// opted into (once per device), the launch error turned into a RuntimeError naming `what`.
template <auto Kernel, typename Params>
void launch(int64_t blocks, int threads, int smem_bytes, const Params& params, cudaStream_t stream, const char* what) {
  if (blocks <= 0) return;
  const unsigned grid = grid_size(blocks, what);
  if (smem_bytes > 0) set_smem_limit_once<Kernel>(smem_bytes, what);
  Kernel<<<grid, threads, smem_bytes, stream>>>(params);
  check_cuda(cudaGetLastError(), what);
}

}  // namespace fae
