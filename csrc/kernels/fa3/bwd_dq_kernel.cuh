// Hopper (sm_90a) FlashAttention backward, deterministic mode: dQ from its own kernel, parallel over query
// tiles, so every dQ row is a sum in one fixed order (no atomics). It recomputes S and dP (the dK/dV kernel
// then runs without its dQ part): about 1.4x the FLOPs of the atomic path, as FA2's deterministic mode.
//
// One block per (query tile of 128 rows, head, batch), shaped like the forward: a producer thread loads Q,
// dO, lse_log2 and Delta once and streams K/V tiles of kBlockN keys through a ring of stages; two consumer
// warpgroups (64 query rows each) compute per K/V tile
//   S = Q K^T, dP = dO V^T                      (SS, all K-major)
//   P = exp2(S * scale_log2 - lse_log2[row]), dS = P * (dP - Delta[row])   (in the accumulators)
//   dQ += dS K                                  (RS: dS from the accumulator; K MN-major, as V in the forward)
// and write dQ * scale in q's dtype and layout at the end.
// Varlen (kVarlen): the grid counts the longest query sequence; a block past its own sequence's end exits whole
// before any barrier. Rows past the end (the next sequence's, when packed) have lse_log2 = +inf in the
// sequence's padded row buffers (P = 0) and are not stored.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../sm80/ptx.h"
#include "../../sm90/ptx.h"
#include "../../sm90/ptx_bwd.h"
#include "../../sm90/wgmma_ops.h"
#include "seq.cuh"

namespace fae {

template <typename T_, int kHeadDim_>
struct Fa3BwdDqTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;              // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = 64;                // keys per K/V tile: S, dP, dS of 64 x 64 fit the registers
  static constexpr int kStages = 2;
  static constexpr int kPanels = kHeadDim / 64;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kPanelQ = kBlockM * 128;     // bytes of one panel of the Q or dO tile
  static constexpr int kPanelKV = kBlockN * 128;    // bytes of one panel of a K or V tile
  static constexpr int kQBytes = kPanelQ * kPanels;
  static constexpr int kKVBytes = kPanelKV * kPanels;
  static constexpr int kRowBytes = kBlockM * 4;
  // Q | dO | K stages | V stages | lse_log2 | Delta | mbarriers.
  static constexpr int kKOffset = 2 * kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr int kLseOffset = kVOffset + kStages * kKVBytes;
  static constexpr int kDeltaOffset = kLseOffset + kRowBytes;
  static constexpr int kBarrierOffset = kDeltaOffset + kRowBytes;
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (1 + 2 * kStages) + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper backward takes head dims 64 and 128");
  static_assert(kBwdSeqRound % kBlockM == 0, "query tiles must not run past the padded row buffers");
  static_assert(kSmemBytes <= 227 * 1024, "tile does not fit in shared memory");
};

template <typename Tr, bool kVarlen>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fa3_bwd_dq_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap tmap_q,
                      const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                      const __grid_constant__ CUtensorMap tmap_do) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim, kStages = Tr::kStages;
  constexpr int kPanels = Tr::kPanels;

  extern __shared__ char smem_raw[];
  char* smem = align_smem_1024(smem_raw);
  char* sQ = smem;
  char* sDo = smem + Tr::kQBytes;
  char* sK = smem + Tr::kKOffset;                   // stage s at sK + s * kKVBytes
  char* sV = smem + Tr::kVOffset;
  float* sLse = reinterpret_cast<float*>(smem + Tr::kLseOffset);
  float* sDelta = reinterpret_cast<float*>(smem + Tr::kDeltaOffset);
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + Tr::kBarrierOffset);  // Q, dO, lse, Delta landed
  uint64_t* bar_kv = bar_q + 1;                     // K and V of stage s landed
  uint64_t* bar_free = bar_kv + kStages;            // both consumers are done with stage s

  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z, hk = h / p.head_group;
  if constexpr (kVarlen) {
    if (m0 >= fa3::sequence<kVarlen>(p, b).seqlen_q) return;  // the whole block, before any barrier
  }
  const SeqInfo seq = fa3::sequence<kVarlen>(p, b);
  const int m_end = min(m0 + kBlockM, seq.seqlen_q);
  const WindowMask mask = WindowMask::of(p, seq);
  // Key tiles this query tile sees: [n_begin, n_begin + n_count) (computed on each side after setmaxnreg).
  auto key_tiles = [&](int& n_begin) {
    const int key_begin = mask.key_begin(m0), key_end = mask.key_end(m_end);
    n_begin = key_begin / kBlockN;
    return key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN - n_begin : 0;
  };

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&bar_kv[s], 1);
      mbar_init(&bar_free[s], Tr::kConsumers * 4);  // one arrive per consumer warp
    }
    mbar_fence_init();
  }
  __syncthreads();

  const int warpgroup = warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    regs_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    int n_begin;
    const int n_count = key_tiles(n_begin);
    if (n_count == 0) return;  // nothing is loaded, nothing left in flight
    tma_prefetch_desc(&tmap_q);
    tma_prefetch_desc(&tmap_k);
    tma_prefetch_desc(&tmap_v);
    tma_prefetch_desc(&tmap_do);
    mbar_arrive_expect_tx(bar_q, 2 * Tr::kQBytes + 2 * Tr::kRowBytes);
    const fa3::TmaRow q_at = fa3::q_rows(seq, m0);
#pragma unroll
    for (int c = 0; c < kPanels; ++c) {
      tma_load_4d(sQ + c * Tr::kPanelQ, &tmap_q, bar_q, c * 64, q_at.row, h, q_at.batch);
      tma_load_4d(sDo + c * Tr::kPanelQ, &tmap_do, bar_q, c * 64, q_at.row, h, q_at.batch);
    }
    // kBlockM rows of the sequence's padded row buffers (a whole number of kBwdSeqRound tiles: in bounds).
    const int64_t row = bwd_row0(p, seq, h) + m0;
    bulk_load(sLse, p.lse_log2 + row, Tr::kRowBytes, bar_q);
    bulk_load(sDelta, p.dsoftmax_sum + row, Tr::kRowBytes, bar_q);
    for (int i = 0; i < n_count; ++i) {
      const int stage = i % kStages;
      const fa3::TmaRow kv_at = fa3::k_rows(seq, (n_begin + i) * kBlockN);
      if (i >= kStages) mbar_wait(&bar_free[stage], ((i / kStages) & 1) ^ 1);
      mbar_arrive_expect_tx(&bar_kv[stage], 2 * Tr::kKVBytes);
#pragma unroll
      for (int c = 0; c < kPanels; ++c) {
        tma_load_4d(sK + stage * Tr::kKVBytes + c * Tr::kPanelKV, &tmap_k, &bar_kv[stage], c * 64, kv_at.row, hk,
                    kv_at.batch);
        tma_load_4d(sV + stage * Tr::kKVBytes + c * Tr::kPanelKV, &tmap_v, &bar_kv[stage], c * 64, kv_at.row, hk,
                    kv_at.batch);
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  regs_alloc<Tr::kConsumerRegs>();
  const int cw = warpgroup - 1;                      // query rows [64 cw, 64 cw + 64) of the tile
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int local0 = cw * 64 + warp * 16 + g;        // this thread's rows in the tile: local0 and local0 + 8
  const uint32_t q_base = sm90::smem_addr(sQ) + cw * 64 * 128, do_base = sm90::smem_addr(sDo) + cw * 64 * 128;

  float acc_dq[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc_dq[i] = 0.f;

  int n_begin;
  const int n_count = key_tiles(n_begin);
  float lse2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  if (n_count > 0) {
    mbar_wait(bar_q, 0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse2[r] = sLse[local0 + 8 * r];
      delta[r] = sDelta[local0 + 8 * r];
    }
  }
  for (int i = 0; i < n_count; ++i) {
    const int stage = i % kStages, n0 = (n_begin + i) * kBlockN;
    const uint32_t k_base = sm90::smem_addr(sK + stage * Tr::kKVBytes);
    const uint32_t v_base = sm90::smem_addr(sV + stage * Tr::kKVBytes);
    mbar_wait(&bar_kv[stage], (i / kStages) & 1);

    // S = Q K^T and dP = dO V^T: D / 16 k-steps, 32 bytes inside a 128-byte swizzle row of one panel.
    float acc_s[kBlockN / 2], acc_dp[kBlockN / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = (kk / 4) * Tr::kPanelQ + (kk % 4) * 32, off_kv = (kk / 4) * Tr::kPanelKV + (kk % 4) * 32;
      WgmmaSS<kBlockN, T, 0>::run(acc_s, smem_desc_sw128(q_base + off, 16, 1024),
                                  smem_desc_sw128(k_base + off_kv, 16, 1024), kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = (kk / 4) * Tr::kPanelQ + (kk % 4) * 32, off_kv = (kk / 4) * Tr::kPanelKV + (kk % 4) * 32;
      WgmmaSS<kBlockN, T, 0>::run(acc_dp, smem_desc_sw128(do_base + off, 16, 1024),
                                  smem_desc_sw128(v_base + off_kv, 16, 1024), kk > 0);
    }
    wgmma_commit();

    // P = exp2(S * scale_log2 - lse_log2[row]), masked entries 0.
    wgmma_wait<1>();
    fence_regs(acc_s);
    const bool needs_mask = !mask.tile_fully_visible(m0, m_end, n0, n0 + kBlockN);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = acc_s[4 * j + 2 * r + e];
          x = sm90::exp2_approx(fmaf(x, p.scale_log2, -lse2[r]));
          if (needs_mask && !mask.visible(m0 + local0 + 8 * r, n0 + 8 * j + 2 * t + e)) x = 0.f;
        }
    // dS = P * (dP - Delta[row]), packed as the A operand of dQ += dS K (16 keys per k-step).
    wgmma_wait<0>();
    fence_regs(acc_dp);
    uint32_t ds_frag[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int i0 = 8 * kk + 2 * q, r = q % 2;  // floats i0, i0 + 1: row g + 8r
        ds_frag[kk][q] = pack2<T>(acc_s[i0] * (acc_dp[i0] - delta[r]), acc_s[i0 + 1] * (acc_dp[i0 + 1] - delta[r]));
      }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      WgmmaRS<kD, T, 1>::run(acc_dq, ds_frag[kk], smem_desc_sw128(k_base + kk * 16 * 128, Tr::kPanelKV, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc_dq);
    if (lane == 0) mbar_arrive(&bar_free[stage]);
  }

  // dq = dQ * scale, rows < the sequence's seqlen_q (a tile that sees no key writes zeros).
  T* dq = seq.q_side(static_cast<T*>(p.dq), p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + local0 + 8 * r;
    if (row >= seq.seqlen_q) continue;
    T* dq_row = dq + static_cast<int64_t>(row) * p.dq_row_stride;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j)
      *reinterpret_cast<uint32_t*>(dq_row + 8 * j + 2 * t) =
          pack2<T>(acc_dq[4 * j + 2 * r] * p.scale, acc_dq[4 * j + 2 * r + 1] * p.scale);
  }
#endif
}

}  // namespace fae
