// Hopper (sm_90a) FlashAttention backward: the dK/dV kernel (dQ leaves it as fp32 reduce-adds to dq_accum).
//
// One block per (key tile of 128 rows, kv head, batch), 3 warpgroups:
//   warpgroup 0 (producer): one thread loads the K and V tiles once (TMA), then streams, for every query head
//     of the GQA group and every query tile of 64 rows that sees some key of the block, the Q and dO tiles
//     (TMA) into a ring of kStages stages; the consumers read the tile's lse_log2 and Delta from L2.
//   warpgroups 1, 2 (consumers): 64 key rows each, so every GEMM has the key rows as its M side:
//     S^T = K Q^T, dP^T = V dO^T              (SS: K, V, Q, dO all K-major as TMA stores them)
//     P^T = exp2(S^T * scale_log2 - lse_log2), dS^T = P^T * (dP^T - Delta)   (in the accumulators)
//     dV += P^T dO                            (RS: P^T straight from the accumulator; dO MN-major)
//     dK += dS^T Q                            (SS: dS^T stored to shared memory as this warpgroup holds it,
//                                              K-major; Q MN-major)
//     dQ_part = dS K                          (SS: the same dS^T read as an MN-major A; K MN-major), added to
//                                              dq_accum with fp32 vector atomics or one bulk reduce
//                                              (Traits: kDqSplit, kDqBulk).
//   dK, dV stay in registers across the whole loop (GQA sums the group's query heads there) and are written
//   once at the end: dK scaled by the softmax scale; dQ is scaled by the convert kernel.
// Query rows past seqlen_q load as zeros (the next sequence's rows when packed) and have lse_log2 = +inf
// (padding of the row buffers), so their P and dS are 0 without a mask; key rows past seqlen_k and the window
// are masked where a tile needs it.
// Varlen (kVarlen): the grid counts the longest key sequence; a block past its own sequence's end exits whole
// before any barrier. lse_log2, Delta and dq_accum rows are at the sequence's own padded rows (seqlen.h
// bwd_row0), a whole number of kBwdSeqRound tiles, so whole-tile reads and the bulk dQ reduce stay inside them;
// dK and dV are stored row by row below the sequence's seqlen_k.
// Not yet: overlap of one step's softmax with the next step's GEMMs inside a warpgroup (the two consumers
// interleave instead), a deterministic dQ order, head dim 256 (dK + dV alone would take 256 registers/thread).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "../../common/mask.h"
#include "../../common/params.h"
#include "../../sm80/ptx.h"
#include "../../sm90/ptx.h"
#include "../../sm90/ptx_bwd.h"
#include "../../sm90/wgmma_ops.h"
#include "bwd_dq.cuh"
#include "seq.cuh"

namespace fae {

template <typename T_, int kHeadDim_>
struct Fa3BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;              // consumer warpgroups, 64 key rows each
  static constexpr int kBlockN = 64 * kConsumers;   // key rows per block
  static constexpr int kBlockM = 64;                // query rows per step
#ifdef FAE_FA3_BWD_STAGES
  static constexpr int kStages = FAE_FA3_BWD_STAGES;  // Q/dO/lse/Delta stages in flight
#else
  static constexpr int kStages = 2;
#endif
  static constexpr int kPanels = kHeadDim / 64;     // 64-column (128-byte) swizzle panels per row
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kPanelQ = kBlockM * 128;     // bytes of one panel of a Q or dO tile
  static constexpr int kPanelKV = kBlockN * 128;    // bytes of one panel of the K or V tile
  static constexpr int kQBytes = kPanelQ * kPanels;
  static constexpr int kKVBytes = kPanelKV * kPanels;
  static constexpr int kDsBytes = 64 * kBlockM * 2; // one consumer's dS^T tile (64 keys x kBlockM queries)
  // dQ of a step: either each consumer multiplies its own 64 keys of dS into the whole dQ tile (dQ reaches
  // global memory twice per step), or, split, each consumer takes half of dQ's columns over all 128 keys of
  // the block (half the atomics and accumulator registers; the consumers then wait for each other's dS^T).
  // The split needs D / 2 to be whole 64-column panels of K: D128.
#ifdef FAE_FA3_BWD_DQ_SPLIT
  static constexpr bool kDqSplit = FAE_FA3_BWD_DQ_SPLIT && kHeadDim == 128;
#else
  static constexpr bool kDqSplit = false;
#endif
  static constexpr int kDqCols = kDqSplit ? kHeadDim / kConsumers : kHeadDim;  // dQ columns per consumer
  static constexpr int kDqKeys = kDqSplit ? kBlockN : 64;                       // keys per consumer's dQ GEMM
  // How dQ reaches dq_accum: per-thread vector atomics (row-major dq_accum), or staged in shared memory and
  // added by one bulk reduce per consumer and step (dq_accum in fragment order, bwd_dq.cuh).
  // Measured on the H200 (bench/NOTES.md): bulk is best at D128 (+20% over per-thread atomics, +1-4% over the
  // split) and, since the staging stores are STS (not generic stores), at D64 too (+38%, was -8%).
#ifdef FAE_FA3_BWD_DQ_BULK
  static constexpr bool kDqBulk = FAE_FA3_BWD_DQ_BULK;
#else
  static constexpr bool kDqBulk = true;
#endif
  static constexpr int kDqPartBytes = kBlockM * kDqCols * 4;  // one consumer's dQ part (fp32)
  // Order of a step's last two GEMMs: dK then dQ, both awaited before dQ is staged (default), or dQ first, so that
  // staging dQ and its reduce run while the tensor cores do dK (experiment, not yet measured: bench/NOTES.md).
#ifdef FAE_FA3_BWD_DQ_FIRST
  static constexpr bool kDqFirst = FAE_FA3_BWD_DQ_FIRST;
#else
  static constexpr bool kDqFirst = false;
#endif
  // K | V | Q stages | dO stages | dS^T per consumer | dQ part per consumer (bulk only) | mbarriers; the
  // swizzled tiles first, each a multiple of the 1024-byte atom. lse_log2 and Delta are read from global memory
  // (L2) by the consumers: staging them through shared memory with bulk copies made the stage's reuse a
  // generic-read / async-write pair that compute-sanitizer's racecheck reports.
  static constexpr int kQOffset = 2 * kKVBytes;
  static constexpr int kDoOffset = kQOffset + kStages * kQBytes;
  static constexpr int kDsOffset = kDoOffset + kStages * kQBytes;
  static constexpr int kDqOffset = kDsOffset + kConsumers * kDsBytes;
  static constexpr int kBarrierOffset = kDqOffset + (kDqBulk ? kConsumers * kDqPartBytes : 0);
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (1 + 2 * kStages) + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  // D256 does not fit: dK and dV alone would take 256 accumulator registers per thread.
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper backward takes head dims 64 and 128");
  static_assert(kBwdSeqRound % kBlockM == 0, "query tiles must not run past the padded row buffers");
  static_assert(kSmemBytes <= 227 * 1024, "tile does not fit in shared memory");
};

namespace fa3 {

template <typename Tr>
struct BwdConsumer {
  using T = typename Tr::T;
  static constexpr int kD = Tr::kHeadDim, kBlockM = Tr::kBlockM;

  // acc (64 keys x kBlockM queries) = A (64 key rows x D) B^T, A = K or V rows of this warpgroup, B = Q or dO:
  // both K-major, a k-step is 32 bytes inside a 128-byte swizzle row of one panel. Issues only.
  static __device__ __forceinline__ void issue_nt(float (&acc)[kBlockM / 2], uint32_t a_base, uint32_t b_base) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;
      const uint64_t da = sm90::smem_desc_sw128(a_base + (kk / 4) * Tr::kPanelKV + off, 16, 1024);
      const uint64_t db = sm90::smem_desc_sw128(b_base + (kk / 4) * Tr::kPanelQ + off, 16, 1024);
      sm90::WgmmaSS<kBlockM, T, 0>::run(acc, da, db, kk > 0);
    }
  }

  // acc (64 keys x D) += A (64 keys x kBlockM queries) B, B = dO or Q tile MN-major: a 16-query k-step is 2
  // atoms of 8 rows (sbo = 1024), D spans the panels (lbo = panel bytes). A from registers (dV += P^T dO) or,
  // K-major, from the stored dS^T (dK += dS^T Q: 64 queries = one 128-byte panel). Issue only.
  static __device__ __forceinline__ void issue_rs(float (&acc)[kD / 2], const uint32_t (&a)[kBlockM / 16][4],
                                                  uint32_t b_base) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint64_t db = sm90::smem_desc_sw128(b_base + kk * 16 * 128, Tr::kPanelQ, 1024);
      sm90::WgmmaRS<kD, T, 1>::run(acc, a[kk], db, 1);
    }
  }
  static __device__ __forceinline__ void issue_ss(float (&acc)[kD / 2], uint32_t a_base, uint32_t b_base) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint64_t da = sm90::smem_desc_sw128(a_base + kk * 32, 16, 1024);
      const uint64_t db = sm90::smem_desc_sw128(b_base + kk * 16 * 128, Tr::kPanelQ, 1024);
      sm90::WgmmaSS<kD, T, 1>::run(acc, da, db, 1);
    }
  }

  // dQ_part (kBlockM queries x kDqCols) = dS (queries x kDqKeys keys) K (kDqKeys keys x kDqCols). dS^T is
  // stored keys x queries (one 128-byte swizzled row per key; the consumers' tiles are adjacent), which is A
  // MN-major; K rows are MN-major B. Issues only.
  static __device__ __forceinline__ void issue_dq(float (&acc)[Tr::kDqCols / 2], uint32_t ds_base, uint32_t k_base) {
#pragma unroll
    for (int kk = 0; kk < Tr::kDqKeys / 16; ++kk) {
      const uint64_t da = sm90::smem_desc_sw128(ds_base + kk * 16 * 128, Tr::kDsBytes, 1024);
      const uint64_t db = sm90::smem_desc_sw128(k_base + kk * 16 * 128, Tr::kPanelKV, 1024);
      sm90::WgmmaSSTransA<Tr::kDqCols, T, 1>::run(acc, da, db, kk > 0);
    }
  }

  // Accumulator -> A fragment (16 queries per k-step = 8-column blocks 2kk, 2kk + 1), as the forward's P.
  static __device__ __forceinline__ void pack(uint32_t (&frag)[kBlockM / 16][4], const float (&acc)[kBlockM / 2]) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) frag[kk][r] = pack2<T>(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
  }

  // Stores dS^T (the accumulator) as 64 swizzled 128-byte rows, one per key: the pair at (key row rr,
  // queries 8j + 2t, +1) goes to 16-byte chunk j ^ (rr % 8) of row rr, as TMA would store a 64 x 64 tile.
  // Across a warp the 8 row groups hit 8 different chunks: no bank conflicts.
  static __device__ __forceinline__ void store_ds(char* ds, const float (&acc)[kBlockM / 2], int warp, int g, int t) {
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rr = warp * 16 + g + 8 * r;
        *reinterpret_cast<uint32_t*>(ds + rr * 128 + ((j ^ g) << 4) + 4 * t) =
            pack2<T>(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
      }
  }
};

}  // namespace fa3

// kWithDq = false (deterministic mode): dK and dV only; dQ comes from fa3_bwd_dq_kernel.
template <typename Tr, bool kWithDq, bool kVarlen>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fa3_bwd_dkdv_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap tmap_q,
                        const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                        const __grid_constant__ CUtensorMap tmap_do) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using T = typename Tr::T;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kD = Tr::kHeadDim, kStages = Tr::kStages;
  constexpr int kPanels = Tr::kPanels;
  constexpr bool kDqSplit = kWithDq && Tr::kDqSplit, kDqBulk = kWithDq && Tr::kDqBulk;

  extern __shared__ char smem_raw[];
  char* smem = align_smem_1024(smem_raw);
  char* sK = smem;
  char* sV = sK + Tr::kKVBytes;
  char* sQ = smem + Tr::kQOffset;                   // stage s at sQ + s * kQBytes
  char* sDo = smem + Tr::kDoOffset;
  char* sDs = smem + Tr::kDsOffset;                 // consumer c at sDs + c * kDsBytes
  uint64_t* bar_kv = reinterpret_cast<uint64_t*>(smem + Tr::kBarrierOffset);  // K and V landed
  uint64_t* bar_full = bar_kv + 1;                  // Q and dO of stage s landed
  uint64_t* bar_free = bar_full + kStages;          // both consumers are done with stage s

  const int n0 = blockIdx.x * kBlockN, hk = blockIdx.y, b = blockIdx.z;
  if constexpr (kVarlen) {
    if (n0 >= fa3::sequence<kVarlen>(p, b).seqlen_k) return;  // the whole block, before any barrier
  }
  const SeqInfo seq = fa3::sequence<kVarlen>(p, b);
  const WindowMask mask = WindowMask::of(p, seq);
  // The steps: query tiles with a row that sees some key of this block, for each query head of the group.
  // Computed by each side after its register reallocation (a value live across setmaxnreg gets spilled).
  struct Steps {
    int m_first, m_count, count, h0;
    __device__ __forceinline__ Steps(const BwdParams& p, const WindowMask& mask, int n0, int hk) {
      const int q_begin = mask.query_begin(n0), q_end = mask.query_end(min(n0 + kBlockN, mask.seqlen_k));
      m_first = q_begin / kBlockM;
      m_count = q_end > q_begin ? (q_end + kBlockM - 1) / kBlockM - m_first : 0;
      count = m_count * p.head_group;
      h0 = hk * p.head_group;
    }
    __device__ __forceinline__ int head(int s) const { return h0 + s / m_count; }
    __device__ __forceinline__ int m0(int s) const { return (m_first + s % m_count) * kBlockM; }
  };

  if (threadIdx.x == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&bar_full[s], 1);
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
    const Steps steps(p, mask, n0, hk);
    if (steps.count == 0) return;  // nothing is loaded, nothing left in flight
    tma_prefetch_desc(&tmap_q);
    tma_prefetch_desc(&tmap_k);
    tma_prefetch_desc(&tmap_v);
    tma_prefetch_desc(&tmap_do);
    mbar_arrive_expect_tx(bar_kv, 2 * Tr::kKVBytes);
    const fa3::TmaRow kv_at = fa3::k_rows(seq, n0);
#pragma unroll
    for (int c = 0; c < kPanels; ++c) {
      tma_load_4d(sK + c * Tr::kPanelKV, &tmap_k, bar_kv, c * 64, kv_at.row, hk, kv_at.batch);
      tma_load_4d(sV + c * Tr::kPanelKV, &tmap_v, bar_kv, c * 64, kv_at.row, hk, kv_at.batch);
    }
    for (int s = 0; s < steps.count; ++s) {
      const int stage = s % kStages;
      // Use r of a stage waits for release r - 1 (completion r - 1 of its free barrier).
      if (s >= kStages) mbar_wait(&bar_free[stage], ((s / kStages) & 1) ^ 1);
      const int h = steps.head(s);
      const fa3::TmaRow q_at = fa3::q_rows(seq, steps.m0(s));
      mbar_arrive_expect_tx(&bar_full[stage], 2 * Tr::kQBytes);
#pragma unroll
      for (int c = 0; c < kPanels; ++c) {
        tma_load_4d(sQ + stage * Tr::kQBytes + c * Tr::kPanelQ, &tmap_q, &bar_full[stage], c * 64, q_at.row, h,
                    q_at.batch);
        tma_load_4d(sDo + stage * Tr::kQBytes + c * Tr::kPanelQ, &tmap_do, &bar_full[stage], c * 64, q_at.row, h,
                    q_at.batch);
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  regs_alloc<Tr::kConsumerRegs>();
  const int cw = warpgroup - 1;                      // consumer index: key rows [64 cw, 64 cw + 64) of the block
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kv0 = n0 + cw * 64;
  const int key0 = kv0 + warp * 16 + g;              // this thread's key rows: key0 and key0 + 8
  const uint32_t k_base = sm90::smem_addr(sK) + cw * 64 * 128, v_base = sm90::smem_addr(sV) + cw * 64 * 128;
  char* ds = sDs + cw * Tr::kDsBytes;
  const uint32_t ds_base = sm90::smem_addr(ds);
  // dQ GEMM operands: split, all keys' dS^T and K's panel cw (columns [64 cw, 64 cw + 64)); else this
  // consumer's keys only.
  const uint32_t dq_a = kDqSplit ? sm90::smem_addr(sDs) : ds_base;
  const uint32_t dq_b = kDqSplit ? sm90::smem_addr(sK) + cw * Tr::kPanelKV : k_base;
  // Who shares the dS^T buffers: this warpgroup, or both consumers when dQ reads the other's keys.
  const int tid = threadIdx.x % 128;
  auto ds_sync = [&] {
    if constexpr (kDqSplit) named_sync(3, 256);
    else named_sync(1 + cw, 128);
  };
  using C = fa3::BwdConsumer<Tr>;

  float acc_dk[kD / 2], acc_dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  const Steps steps(p, mask, n0, hk);
  // lse_log2 and Delta of a step's kBlockM query rows (padded row buffers: rows past seqlen_q hold +inf / 0)
  // come from L2 one step ahead: lane l loads rows 2l and 2l + 1 (kBlockM = 64 = 2 x 32 lanes) while the step
  // before runs, and at the step each thread shuffles out the 16 values its fragment needs. (Loaded at the step
  // itself, the first use of lse still waited on L2 after the S GEMM: ncu's top stall, bench/NOTES.md.)
  static_assert(kBlockM == 64, "one float2 of each row buffer per lane");
  auto load_rows = [&](int s, float2& lse_rows, float2& delta_rows) {
    const int64_t row = bwd_row0(p, seq, steps.head(s)) + steps.m0(s) + 2 * lane;
    lse_rows = *reinterpret_cast<const float2*>(p.lse_log2 + row);
    delta_rows = *reinterpret_cast<const float2*>(p.dsoftmax_sum + row);
  };
  float2 lse_next = make_float2(0.f, 0.f), delta_next = make_float2(0.f, 0.f);
  if (steps.count > 0) {
    load_rows(0, lse_next, delta_next);
    mbar_wait(bar_kv, 0);
  }
  for (int s = 0; s < steps.count; ++s) {
    const int stage = s % kStages, h = steps.head(s), m0 = steps.m0(s);
    const uint32_t q_base = sm90::smem_addr(sQ + stage * Tr::kQBytes);
    const uint32_t do_base = sm90::smem_addr(sDo + stage * Tr::kQBytes);
    // This thread's query columns 8j + 2t, +1 are rows held by lane 4j + t.
    float2 lse_v[kBlockM / 8], delta_v[kBlockM / 8];
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
      lse_v[j] = make_float2(__shfl_sync(0xffffffff, lse_next.x, 4 * j + t), __shfl_sync(0xffffffff, lse_next.y, 4 * j + t));
      delta_v[j] =
          make_float2(__shfl_sync(0xffffffff, delta_next.x, 4 * j + t), __shfl_sync(0xffffffff, delta_next.y, 4 * j + t));
    }
    if (s + 1 < steps.count) load_rows(s + 1, lse_next, delta_next);
    mbar_wait(&bar_full[stage], (s / kStages) & 1);

    float acc_s[kBlockM / 2], acc_dp[kBlockM / 2];
    wgmma_fence();
    C::issue_nt(acc_s, k_base, q_base);
    wgmma_commit();
    C::issue_nt(acc_dp, v_base, do_base);
    wgmma_commit();

    // P^T = exp2(S^T * scale_log2 - lse_log2[query]); masked entries 0.
    wgmma_wait<1>();  // S done; dP may still run
    fence_regs(acc_s);
    const bool needs_mask = !mask.tile_fully_visible(m0, min(m0 + kBlockM, seq.seqlen_q), kv0, kv0 + 64);
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
      const float2 l = lse_v[j];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = acc_s[4 * j + 2 * r + e];
          x = sm90::exp2_approx(fmaf(x, p.scale_log2, -(e ? l.y : l.x)));
          if (needs_mask && !mask.visible(m0 + 8 * j + 2 * t + e, key0 + 8 * r)) x = 0.f;
        }
    }
    // dV += P^T dO runs while the warpgroup computes dS.
    uint32_t p_frag[kBlockM / 16][4];
    C::pack(p_frag, acc_s);
    wgmma_fence();
    C::issue_rs(acc_dv, p_frag, do_base);
    wgmma_commit();

    // dS^T = P^T * (dP^T - Delta[query]).
    wgmma_wait<1>();
    fence_regs(acc_dp);
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
      const float2 d = delta_v[j];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * j + 2 * r + e;
          acc_dp[i] = acc_s[i] * (acc_dp[i] - (e ? d.y : d.x));
        }
    }

    // dS^T to shared memory, the A operand of dK += dS^T Q (K-major) and dQ = dS K (MN-major). The barrier
    // before the stores: every warp that reads this buffer is past the previous step's GEMMs. The one after:
    // all of dS^T is written.
    if constexpr (kDqBulk) {
      if (tid == 0) bulk_wait_read<0>();  // the previous step's dQ part is read: the buffer is free after ds_sync
    }
    ds_sync();
    C::store_ds(ds, acc_dp, warp, g, t);
    fence_proxy_async_smem();
    ds_sync();

    float acc_dq[kWithDq ? Tr::kDqCols / 2 : 1];
    constexpr bool kDqFirst = kWithDq && Tr::kDqFirst;
    wgmma_fence();
    if constexpr (kDqFirst) {
      C::issue_dq(acc_dq, dq_a, dq_b);
      wgmma_commit();
      C::issue_ss(acc_dk, ds_base, q_base);
      wgmma_commit();
      wgmma_wait<1>();  // dV and dQ done; dK may still run (the stage is released after it, below)
      fence_regs(acc_dv);
      fence_regs(acc_dq);
    } else {
      C::issue_ss(acc_dk, ds_base, q_base);
      if constexpr (kWithDq) C::issue_dq(acc_dq, dq_a, dq_b);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc_dv);
      fence_regs(acc_dk);
      fence_regs(acc_dq);
      if (lane == 0) mbar_arrive(&bar_free[stage]);
    }
    if constexpr (!kWithDq) continue;

    // dq_accum rows m0 .. m0 + 63 (inside the sequence's padded rows: no bounds check; rows past seqlen_q add
    // zeros there), this consumer's columns.
    const int64_t tile_row = bwd_row0(p, seq, h) + m0;
    if constexpr (kDqBulk) {
      float* dq_part = reinterpret_cast<float*>(smem + Tr::kDqOffset) + cw * (Tr::kDqPartBytes / 4);
#pragma unroll
      for (int j = 0; j < Tr::kDqCols / 8; ++j)
        *reinterpret_cast<float4*>(dq_part + fa3::dq_frag_offset(j, tid)) =
            make_float4(acc_dq[4 * j], acc_dq[4 * j + 1], acc_dq[4 * j + 2], acc_dq[4 * j + 3]);
      fence_proxy_async_smem();
      named_sync(4 + cw, 128);
      if (tid == 0) {
        const int part = kDqSplit ? cw : 0;
        bulk_reduce_add_f32(p.dq_accum + tile_row * kD + part * (Tr::kDqPartBytes / 4), dq_part, Tr::kDqPartBytes);
        bulk_commit();
      }
    } else if constexpr (kWithDq) {
      float* dq = p.dq_accum + (tile_row + warp * 16 + g) * kD + (kDqSplit ? cw * Tr::kDqCols : 0) + 2 * t;
#pragma unroll
      for (int j = 0; j < Tr::kDqCols / 8; ++j) {
        red_add_v2(dq + 8 * j, acc_dq[4 * j], acc_dq[4 * j + 1]);
        red_add_v2(dq + 8 * kD + 8 * j, acc_dq[4 * j + 2], acc_dq[4 * j + 3]);
      }
    }
    if constexpr (kDqFirst) {
      wgmma_wait<0>();  // dK done: the stage's Q and this step's dS^T are read
      fence_regs(acc_dk);
      if (lane == 0) mbar_arrive(&bar_free[stage]);
    }
  }
  if constexpr (kDqBulk) {
    if (tid == 0) bulk_wait<0>();  // the shared-memory source must outlive the reads (and the block)
  }

  // Epilogue: dK * scale and dV in the input dtype, rows < the sequence's seqlen_k (a block with no step writes
  // zeros).
  T* dk = seq.k_side(static_cast<T*>(p.dk), p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, hk);
  T* dv = seq.k_side(static_cast<T*>(p.dv), p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, hk);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= seq.seqlen_k) continue;
    T* dk_row = dk + static_cast<int64_t>(key) * p.dk_row_stride;
    T* dv_row = dv + static_cast<int64_t>(key) * p.dv_row_stride;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      *reinterpret_cast<uint32_t*>(dk_row + 8 * j + 2 * t) =
          pack2<T>(acc_dk[4 * j + 2 * r] * p.scale, acc_dk[4 * j + 2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + 8 * j + 2 * t) = pack2<T>(acc_dv[4 * j + 2 * r], acc_dv[4 * j + 2 * r + 1]);
    }
  }
#endif
}

}  // namespace fae
