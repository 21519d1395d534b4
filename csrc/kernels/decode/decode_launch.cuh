// Host-side launch of the KV-cache attention kernels (append_kernel.cuh, split_kv_kernel.cuh, combine_kernel.cuh)
// for one (dtype, head dim): the append kernel when new tokens are given, then the split kernel, then the combine
// kernel when num_splits > 1, all on `stream` and none reading anything on the host (CUDA-graph capturable).
//
// The split kernel is built in a few variants (DecodeTraits knobs) so one GPU run can compare them: the
// environment variable FAE_DECODE_VARIANT names the one to use (read on every call, so a benchmark can switch
// between calls; a graph replays the variant it captured). Unset: decode_plan chooses per call. Bulk variants need
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
#include "heads_kernel.cuh"
#include "split_kv_kernel.cuh"

namespace fae {

// Measured on the H200 (bench/NOTES.md, decode rework): bulk_4w3s beats cp_4w3s on every row (page 1: 1.8 -> 3.3
// TB/s at B >= 16) and every other shape tried (cp_2w4s, bulk_2w6s, L2-prefetch forms: all slower, dropped to keep
// the build small). cp_4w3s stays as the sm_80 path; bulk_2w4s (3 blocks/SM) as the runner-up to re-measure.
// heads4_3s (heads_kernel.cuh): 4 kv heads per block, one copy per key row of all 4; a call whose kv head count is
// not a multiple of 4 (or a GPU without sm_90 code) runs bulk_4w3s instead. 8 heads per block (1 block/SM, 2 KB
// copies) measured within +0-1.5% of it at batch >= 16 and slower at one sequence: not kept.
//                               name              warps stages bulk L2-prefetch kv-heads-per-block
#define FAE_DECODE_VARIANTS(X) \
  X(0, "bulk_4w3s", 4, 3, true, 0, 1)       /* 64-key tiles, one 1-D bulk copy per K/V row, 2 blocks/SM */ \
  X(1, "cp_4w3s", 4, 3, false, 0, 1)        /* 64-key tiles, 16-byte cp.async gathers, 2 blocks/SM */ \
  X(2, "bulk_2w4s", 2, 4, true, 0, 1)       /* 32-key tiles, bulk rows, 4 stages, 3 blocks/SM */ \
  X(3, "heads4_3s", 4, 3, true, 0, 4)       /* 16-key tiles of 4 heads, one bulk copy per key row, 2 blocks/SM */
constexpr int kPerHeadDecodeVariant = 0;  // bulk_4w3s: the fallback of the heads-per-block variants
constexpr int kHeadsDecodeVariant = 3;    // heads4_3s: decode_plan's choice where its blocks can fill the GPU

// The variant FAE_DECODE_VARIANT names (-1 when unset or empty: decode_plan chooses); throws on an unknown name.
inline int decode_variant_from_env() {
  const char* env = std::getenv("FAE_DECODE_VARIANT");
  if (env == nullptr || env[0] == '\0') return -1;
#define FAE_DECODE_VARIANT_NAME(id, name, warps, stages, bulk, prefetch, heads) \
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

// Calls f(traits of `variant`) for a call with heads_kv kv heads. A bulk variant whose code for this
// GPU is not sm_90 code (an older GPU, or a build without sm_90) runs as the cp.async variant of the same shape;
// a heads-per-block variant that does not divide heads_kv, or without sm_90 code, runs as bulk_4w3s (or that
// one's fallback).
template <typename T, int kHeadDim, typename F>
void decode_variant_switch(int variant, int heads_kv, F&& f) {
  auto per_head = [&](auto chosen) {
    using Chosen = decltype(chosen);
    if (Chosen::kBulk && !compiled_for_sm90<decode_split_kernel<Chosen>>())
      f(DecodeTraits<T, kHeadDim, Chosen::kWarps, Chosen::kStages, false, Chosen::kPrefetch>{});
    else
      f(chosen);
  };
  switch (variant) {
#define FAE_DECODE_VARIANT_CASE(id, name, warps, stages, bulk, prefetch, heads)                     \
  case id: {                                                                                       \
    if constexpr (heads > 1) {                                                                     \
      using Chosen = DecodeHeadsTraits<T, kHeadDim, heads, stages>;                                \
      if (heads_kv % heads == 0 && compiled_for_sm90<decode_heads_kernel<Chosen>>())               \
        f(Chosen{});                                                                               \
      else                                                                                         \
        decode_variant_switch<T, kHeadDim>(kPerHeadDecodeVariant, heads_kv, f);                     \
    } else {                                                                                       \
      per_head(DecodeTraits<T, kHeadDim, warps, stages, bulk, prefetch>{});                        \
    }                                                                                              \
    return;                                                                                        \
  }
    FAE_DECODE_VARIANTS(FAE_DECODE_VARIANT_CASE)
#undef FAE_DECODE_VARIANT_CASE
    default: throw std::logic_error("flashattn_ext: decode variant out of range");
  }
}

// The split kernel of traits Tr (the per-head one, or the heads-per-block one).
template <typename Tr>
constexpr auto decode_kernel_of() {
  if constexpr (Tr::kHeadsPerBlock > 1)
    return decode_heads_kernel<Tr>;
  else
    return decode_split_kernel<Tr>;
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
    constexpr auto kernel = decode_kernel_of<Tr>();
    set_smem_limit_once<kernel>(Tr::kSmemBytes, "decode_split");
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Tr::kThreads, Tr::kSmemBytes),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(decode_split)");
    return n > 0 ? n : 1;
  }();
  return blocks;
}

// Blocks per SM and kv heads per block of what `variant` runs for a call with heads_kv kv heads.
template <typename T, int kHeadDim>
DecodePlan decode_plan_of(int variant, int heads_kv) {
  DecodePlan plan{variant, 1, 1};
  decode_variant_switch<T, kHeadDim>(variant, heads_kv, [&](auto tr) {
    using Tr = decltype(tr);
    plan.blocks_per_sm = decode_blocks_per_sm_of<Tr>();
    plan.heads_per_block = Tr::kHeadsPerBlock;
  });
  return plan;
}

// The split kernel for a call (host-side queries only: no sync). FAE_DECODE_VARIANT when set; else heads4_3s
// where the block's 4 heads are adjacent in the cache (head stride D: the paged (pages, page, Hkv, D) layout)
// and its blocks, split at most max_splits ways, can fill a wave of `sms` SMs; else bulk_4w3s. Measured on the
// H200 (bench/NOTES.md): heads4_3s is 5-15% faster on the paged cache at batch >= 16 and slower where it cannot
// fill the GPU (one 32k sequence: 2 blocks of heads x 64 splits is half a wave) or copies one head per row (the
// (B, Hkv, L, D) cache).
template <typename T, int kHeadDim>
DecodePlan decode_plan(const KvCacheParams& p, int sms, int64_t max_splits) {
  const int env = decode_variant_from_env();
  if (env >= 0) return decode_plan_of<T, kHeadDim>(env, p.heads_kv);
  const bool adjacent = p.k_head_stride == kHeadDim && p.v_head_stride == kHeadDim;
  if (adjacent && p.heads_kv % 4 == 0) {
    const DecodePlan heads = decode_plan_of<T, kHeadDim>(kHeadsDecodeVariant, p.heads_kv);
    const double blocks = static_cast<double>(p.batch) * p.num_m_blocks * (p.heads_kv / heads.heads_per_block) *
                          static_cast<double>(max_splits);
    // (0.95: the wave efficiency kvcache.cpp's split heuristic aims for)
    if (heads.heads_per_block > 1 && blocks >= 0.95 * sms * heads.blocks_per_sm) return heads;
  }
  return decode_plan_of<T, kHeadDim>(kPerHeadDecodeVariant, p.heads_kv);
}

template <typename T, int kHeadDim>
void run_kvcache_fwd(const KvCacheParams& p, cudaStream_t stream) {
  if (p.k_new != nullptr && p.seqlen_new > 0) {
    const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_kv * p.seqlen_new * (kHeadDim / 8);
    launch<kvcache_append_kernel<T, kHeadDim>>((chunks + 255) / 256, 256, 0, p, stream, "kvcache_append");
  }
  int64_t blocks = 0;
  decode_variant_switch<T, kHeadDim>(p.split_variant, p.heads_kv, [&](auto tr) {
    using Tr = decltype(tr);
    blocks = static_cast<int64_t>(p.num_splits) * p.num_m_blocks * p.batch * (p.heads_kv / Tr::kHeadsPerBlock);
    launch<decode_kernel_of<Tr>()>(blocks, Tr::kThreads, Tr::kSmemBytes, p, stream, "decode_split");
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
