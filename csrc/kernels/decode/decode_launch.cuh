// Host-side launch of the KV-cache attention kernels (append_kernel.cuh, split_kv_kernel.cuh, combine_kernel.cuh)
// for one (dtype, head dim): the append kernel when new tokens are given, then the split kernel, then the combine
// kernel when num_splits > 1, all on `stream` and none reading anything on the host (CUDA-graph capturable).
//
// The split kernel is built in a few variants (DecodeTraits knobs) so one GPU run can compare them: the
// environment variable FAE_DECODE_VARIANT names the one to use (read on every call, so a benchmark can switch
// between calls; a graph replays the variant it captured). Unset: kDefaultDecodeVariant. Bulk variants need
// sm_90; on an older GPU they fall back to the cp.async variant of the same shape.
#pragma once
#include <cuda_runtime.h>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include "../launch.h"
#include "append_kernel.cuh"
#include "combine_kernel.cuh"
#include "split_kv_kernel.cuh"

namespace fae {

// Measured on the H200 (bench/NOTES.md, decode rework): bulk_4w3s beats cp_4w3s on every row (page 1: 1.8 -> 3.3
// TB/s at B >= 16) and every other shape tried (cp_2w4s, bulk_2w6s, L2-prefetch forms: all slower, dropped to keep
// the build small). cp_4w3s stays as the sm_80 path; bulk_2w4s (3 blocks/SM) as the runner-up to re-measure.
//                               name              warps stages bulk L2-prefetch tiles
#define FAE_DECODE_VARIANTS(X) \
  X(0, "bulk_4w3s", 4, 3, true, 0)       /* 64-key tiles, one 1-D bulk copy per K/V row, 2 blocks/SM */ \
  X(1, "cp_4w3s", 4, 3, false, 0)        /* 64-key tiles, 16-byte cp.async gathers, 2 blocks/SM */ \
  X(2, "bulk_2w4s", 2, 4, true, 0)       /* 32-key tiles, bulk rows, 4 stages, 3 blocks/SM */
constexpr int kDefaultDecodeVariant = 0;

// The variant FAE_DECODE_VARIANT names (kDefaultDecodeVariant when unset or empty); throws on an unknown name.
inline int decode_variant_from_env() {
  const char* env = std::getenv("FAE_DECODE_VARIANT");
  if (env == nullptr || env[0] == '\0') return kDefaultDecodeVariant;
#define FAE_DECODE_VARIANT_NAME(id, name, warps, stages, bulk, prefetch) \
  if (std::strcmp(env, name) == 0) return id;
  FAE_DECODE_VARIANTS(FAE_DECODE_VARIANT_NAME)
#undef FAE_DECODE_VARIANT_NAME
  throw std::invalid_argument(std::string("flashattn_ext: FAE_DECODE_VARIANT='") + env +
                              "' is not a decode variant (csrc/kernels/decode/decode_launch.cuh lists them: "
                              "flashattn_ext.kvcache.DECODE_VARIANTS)");
}

// Whether the code of `Kernel` that runs on this process's GPUs was compiled for sm_90 or later, i.e. holds the
// bulk-copy and griddepcontrol paths (a build with only sm_80 code runs its PTX on a Hopper: those paths are
// compiled out there). A host-side query (no sync), once per kernel.
template <auto Kernel>
bool compiled_for_sm90() {
  static const bool yes = [] {
    cudaFuncAttributes attr{};
    check_cuda(cudaFuncGetAttributes(&attr, Kernel), "cudaFuncGetAttributes(decode)");
    return attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  }();
  return yes;
}

// Calls f(DecodeTraits of the selected variant). A bulk variant whose code for this GPU is not sm_90 code (an
// older GPU, or a build without sm_90) runs as the cp.async variant of the same shape.
template <typename T, int kHeadDim, typename F>
void decode_variant_switch(F&& f) {
  switch (decode_variant_from_env()) {
#define FAE_DECODE_VARIANT_CASE(id, name, warps, stages, bulk, prefetch)                            \
  case id: {                                                                                       \
    using Chosen = DecodeTraits<T, kHeadDim, warps, stages, bulk, prefetch>;                       \
    if (bulk && !compiled_for_sm90<decode_split_kernel<Chosen>>())                                 \
      f(DecodeTraits<T, kHeadDim, warps, stages, false, prefetch>{});                              \
    else                                                                                           \
      f(Chosen{});                                                                                 \
    return;                                                                                        \
  }
    FAE_DECODE_VARIANTS(FAE_DECODE_VARIANT_CASE)
#undef FAE_DECODE_VARIANT_CASE
    default: throw std::logic_error("flashattn_ext: decode variant out of range");
  }
}

// Whether the combine kernel is launched as a programmatic dependent of the split kernel (sm_90): its blocks
// start while the split grid's last blocks run and wait in griddepcontrol.wait until that grid has finished and
// its partials are visible, which hides the launch gap between the two (about a microsecond of the ~35 us one
// long sequence takes). FAE_DECODE_PDL=0 turns it off (a plain launch in stream order).
inline bool decode_pdl_from_env() {
  const char* env = std::getenv("FAE_DECODE_PDL");
  return env == nullptr || env[0] != '0';
}

template <auto Kernel>
void launch_programmatic_dependent(int64_t blocks, int threads, const KvCacheParams& p, cudaStream_t stream,
                                   const char* what) {
  if (blocks <= 0) return;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid_size(blocks, what));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&cfg, Kernel, p), what);
}

// Resident split-kernel blocks per SM of one variant, for the host's num_splits heuristic (a host-side query: no
// sync). Queried once per process (the first call, normally before any graph capture), like the smem attribute.
template <typename Tr>
int decode_blocks_per_sm_of() {
  static const int blocks = [] {
    set_smem_limit_once<decode_split_kernel<Tr>>(Tr::kSmemBytes, "decode_split");
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_kernel<Tr>, Tr::kThreads,
                                                             Tr::kSmemBytes),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(decode_split)");
    return n > 0 ? n : 1;
  }();
  return blocks;
}

// Resident blocks per SM of the selected variant.
template <typename T, int kHeadDim>
int decode_blocks_per_sm() {
  int blocks = 1;
  decode_variant_switch<T, kHeadDim>([&](auto tr) { blocks = decode_blocks_per_sm_of<decltype(tr)>(); });
  return blocks;
}

template <typename T, int kHeadDim>
void run_kvcache_fwd(const KvCacheParams& p, cudaStream_t stream) {
  if (p.k_new != nullptr && p.seqlen_new > 0) {
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_kv * p.seqlen_new * (kHeadDim / 8);
    launch<kvcache_append_kernel<T, kHeadDim>>((chunks + 255) / 256, 256, 0, p, stream, "kvcache_append");
  }
  const int64_t blocks = static_cast<int64_t>(p.num_splits) * p.num_m_blocks * p.batch * p.heads_kv;
  decode_variant_switch<T, kHeadDim>([&](auto tr) {
    using Tr = decltype(tr);
    launch<decode_split_kernel<Tr>>(blocks, Tr::kThreads, Tr::kSmemBytes, p, stream, "decode_split");
  });
  if (blocks > 0 && p.num_splits > 1) {
    constexpr int kRowsPerBlock = 128 / (kHeadDim / 4);
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    const int64_t combine_blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    if (decode_pdl_from_env() && compiled_for_sm90<decode_combine_kernel<T, kHeadDim>>())
      launch_programmatic_dependent<decode_combine_kernel<T, kHeadDim>>(combine_blocks, 128, p, stream,
                                                                         "decode_combine");
    else
      launch<decode_combine_kernel<T, kHeadDim>>(combine_blocks, 128, 0, p, stream, "decode_combine");
  }
}

}  // namespace fae
