// Host-side launch of the Hopper forward for one (dtype, head dim): tensor maps for Q, K, V, then the kernel
// (its varlen instantiation when the params carry cu_seqlens; the grid is then counted by max_seqlen_q).
#pragma once
#include <cuda_runtime.h>
#include <type_traits>
#include "../launch.h"
#include "fwd_kernel.cuh"
#include "tmaps.h"

namespace fae {

template <typename Tr, bool kVarlen, bool kGlobal>
void launch_fa3_fwd_kernel(const FwdParams& params, const CUtensorMap& tq, const CUtensorMap& tk,
                           const CUtensorMap& tv, const CUtensorMap& tgk, const CUtensorMap& tgv, int num_tiles,
                           cudaStream_t stream) {
  constexpr auto kernel = fa3_fwd_kernel<Tr, kVarlen, kGlobal>;
  set_smem_limit_once<kernel>(Tr::kSmemBytes, "fa3_fwd");
  // Persistent (one block per SM, striding over the tiles: the next tile's Q and K/V load under this one and
  // O leaves through shared memory) or one block per tile (the hardware hands tiles to SMs as they free up:
  // better balanced when tiles differ in length). Measured on the H200 (bench/NOTES.md, same run): persistent
  // +3-9% at S1k, +4-5% at S4k, equal at D128 S16k, but -5% at D64 S16k causal, where the causal tiles are
  // long and unequal. A band (window_left >= 0) has tiles of about one length at any S: persistent, measured
  // +3.5% / +6% at window 1024 causal S16k / S64k. Packed sequences (kVarlen) have tiles as long as their own
  // sequence and a grid counted by the longest, half of it empty tiles: one block per tile, measured +5.5% on
  // bench_fwd's 12 sequences summing to 16k (causal equal). FAE_FA3_PERSISTENT=1 / =0 force either (A/B).
  const bool masked = params.window_left >= 0 || params.window_right >= 0;
#ifdef FAE_FA3_PERSISTENT
  const bool persistent = FAE_FA3_PERSISTENT;
#else
  const bool persistent = !kVarlen && (!masked || params.seqlen_k <= 8192 || params.window_left >= 0);
#endif
  int grid = num_tiles;
  if (persistent) {
    int device = 0, sms = 0;  // host-side attribute queries: no sync, capture-safe
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute(SMs)");
    grid = num_tiles > sms ? sms : num_tiles;
  }
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(params, tq, tk, tv, tgk, tgv, num_tiles);
  check_cuda(cudaGetLastError(), "fa3_fwd launch");
}

// kGlobal: with the gathered global keys (params.num_global > 0; padded batches only, fwd_global checks).
template <typename Tr, bool kGlobal = false>
void run_fa3_fwd_tiles(const FwdParams& params, cudaStream_t stream) {
  using T = typename Tr::T;
  constexpr int kHeadDim = Tr::kHeadDim;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const int64_t num_m_blocks = (params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t blocks = num_m_blocks * params.batch * params.heads_q;
  if (blocks == 0) return;
  const CUtensorMap tq = fa3::q_side_tmap(params, params.q, kBf16, kHeadDim, params.q_batch_stride,
                                          params.q_head_stride, params.q_row_stride, Tr::kBlockM);
  const CUtensorMap tk = fa3::k_side_tmap(params, params.k, kBf16, kHeadDim, params.k_batch_stride,
                                          params.k_head_stride, params.k_row_stride, Tr::kBlockN);
  const CUtensorMap tv = fa3::k_side_tmap(params, params.v, kBf16, kHeadDim, params.v_batch_stride,
                                          params.v_head_stride, params.v_row_stride, Tr::kBlockN);
  const int num_tiles = static_cast<int>(grid_size(blocks, "fa3_fwd"));
  // The staged epilogue stores O in 16-byte pieces; the op allocates O like Q (TMA already needs Q's rows
  // 16-byte aligned), so this only guards a future caller that passes another buffer.
  if (Tr::kStagedO && (reinterpret_cast<uintptr_t>(params.o) % 16 != 0 || params.o_row_stride % 8 != 0))
    throw std::runtime_error("flashattn_ext: fa3_fwd needs the output's rows 16-byte aligned");
  if constexpr (kGlobal) {
    const CUtensorMap tgk = fa3::global_key_tmap(params, params.global_k, kBf16, kHeadDim, Tr::kBlockN);
    const CUtensorMap tgv = fa3::global_key_tmap(params, params.global_v, kBf16, kHeadDim, Tr::kBlockN);
    launch_fa3_fwd_kernel<Tr, false, true>(params, tq, tk, tv, tgk, tgv, num_tiles, stream);
  } else if (params.cu_seqlens_q != nullptr) {
    launch_fa3_fwd_kernel<Tr, true, false>(params, tq, tk, tv, tk, tv, num_tiles, stream);
  } else {
    launch_fa3_fwd_kernel<Tr, false, false>(params, tq, tk, tv, tk, tv, num_tiles, stream);
  }
}

// D64 rows of at least kTallMinRows queries (varlen: the longest sequence) run the tall tiles (Fa3FwdTraits).
#ifdef FAE_FA3_TALL_MIN_ROWS  // A/B experiment (bench/probe_batch.sh); a huge value turns tall tiles off
constexpr int64_t kTallMinRows = FAE_FA3_TALL_MIN_ROWS;
#else
constexpr int64_t kTallMinRows = 2048;
#endif

template <typename T, int kHeadDim>
void run_fa3_fwd(const FwdParams& params, cudaStream_t stream) {
  // Global keys: one configuration per head dim (the 128-row tiles; window rows are short anyway).
  if (params.num_global > 0) return run_fa3_fwd_tiles<Fa3FwdTraits<T, kHeadDim>, true>(params, stream);
  if constexpr (kHeadDim == 64) {
    if (params.seqlen_q >= kTallMinRows) return run_fa3_fwd_tiles<Fa3FwdTraits<T, kHeadDim, true>>(params, stream);
  }
  run_fa3_fwd_tiles<Fa3FwdTraits<T, kHeadDim>>(params, stream);
}

}  // namespace fae
