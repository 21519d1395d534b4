// decode_split_kernel: attention of packed (query row, group head) rows over one split of the keys (see
// decode_common.cuh for the three decode kernels and their order).
#pragma once
#include "decode_common.cuh"
#include "../../sm90/ptx.h"
#include "../../sm90/ptx_bwd.h"

namespace fae {

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads) decode_split_kernel(const __grid_constant__ KvCacheParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kWarpN = Tr::kWarpN;
  constexpr int kDT = Tr::kDTiles, kStages = Tr::kStages, kWarps = Tr::kWarps;
  constexpr int kCPR = Tr::kChunksPerRow;
  using QTile = typename Tr::QTile;
  using KVTile = typename Tr::KVTile;

  extern __shared__ __align__(16) char smem[];
  [[maybe_unused]] uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // bulk: one mbarrier per ring stage
  const uint32_t sQbase = smem_addr(smem);
  const uint32_t sQ = sQbase + Tr::kBarBytes;
  const uint32_t sRing = sQ + QTile::kBytes;  // stage s: K at sRing + 2*s*KV, V right after it

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The combine kernel may be scheduled once every block of this grid has started (it waits for this grid's
  // completion itself, griddepcontrol.wait): its launch overlaps our last wave. No effect without a dependent.
  asm volatile("griddepcontrol.launch_dependents;");
#endif

  // Flat grid: split fastest, then m-block, then (batch, kv head).
  const int split = blockIdx.x % p.num_splits;
  const int rest = blockIdx.x / p.num_splits;
  const int m_block = rest % p.num_m_blocks;
  const int bh = rest / p.num_m_blocks;
  const int b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const SeqInfo seq(b, p.seqlen_q, 0);  // the cache is paged by block_table; q, o, new tokens per sequence
  const int group = p.head_group;
  const int rows = p.seqlen_q * group;  // packed row r = i * group + (h - hk * group)
  const int mr0 = m_block * kBlockM;
  const int mr_end = min(mr0 + kBlockM, rows);

  const int seqlen_k = kvcache_seqlen_k(p, b);
  const WindowMask mask{p.seqlen_q, seqlen_k, p.window_left, p.window_right};
  const int i_lo = mr0 / group, i_end = (mr_end - 1) / group + 1;  // query rows [i_lo, i_end) of this block
  const int2 pos_range = kvcache_pos_range(p, mask, b, i_lo, i_end);
  const int2 tiles = split_tile_range(mask.key_begin_at(pos_range.x), mask.key_end_at(pos_range.y), kBlockN, split,
                                      p.num_splits);
  const int tile_begin = tiles.x, tile_end = tiles.y, n_tiles = tile_end - tile_begin;

  const T* k_base = static_cast<const T*>(p.k_cache) + hk * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v_cache) + hk * p.v_head_stride;
  const PageSplitter pages(p.page_size, p.block_table == nullptr);

  // This thread's rows of a tile: tile * kBlockN + r0 + it * kRowStep. cp.async: chunk column c of K and V;
  // bulk: the whole row, of K (tid < kBlockN) or V.
  const int r0 = Tr::kBulk ? tid % kBlockN : tid / kCPR;
  const int c = Tr::kBulk ? 0 : (tid % kCPR) * 8;
  // Physical page of each of this thread's rows of one tile (-1: zero-fill: past the keys, past the split or a
  // bad table entry), read one tile before the copies that use it.
  auto fetch_pages = [&](int tile, int (&page)[Tr::kRowsPerThread]) {
#pragma unroll
    for (int it = 0; it < Tr::kRowsPerThread; ++it) {
      const int pos = tile * kBlockN + r0 + it * Tr::kRowStep;
      page[it] = tile < tile_end && pos < seqlen_k ? kvcache_physical_page(p, b, pages.page_of(pos)) : -1;
    }
  };

  // Copies of tile `tile` (pages from fetch_pages) into ring stage `stage`. cp.async: one commit group per call
  // (empty past the split), waited with cp_async_wait. bulk: each thread arrives once on the stage's mbarrier
  // (with its row's bytes, or after zero-filling its row), nothing past the split.
  auto load_tile = [&](int stage, int tile, const int (&page)[Tr::kRowsPerThread]) {
    const uint32_t sK = sRing + 2 * stage * KVTile::kBytes, sV = sK + KVTile::kBytes;
    if constexpr (Tr::kBulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if (tile < tile_end) {
        const bool is_v = tid >= kBlockN;
        const int pos = tile * kBlockN + r0;
        const uint32_t dst = KVTile::addr(is_v ? sV : sK, r0, 0);
        uint64_t* bar = bars + stage;
        if (page[0] >= 0) {
          const int row = pages.row_of(pos, pages.page_of(pos));
          const T* src = is_v ? v_base + page[0] * p.v_page_stride + row * p.v_row_stride
                              : k_base + page[0] * p.k_page_stride + row * p.k_row_stride;
          sm90::mbar_arrive_expect_tx(bar, Tr::kRowBytes);
          sm90::bulk_load(smem + (dst - sQbase), src, Tr::kRowBytes, bar);
        } else {
          // Zero-fill: the row is masked, but P = 0 times a NaN left in the ring would still be NaN. The fence
          // orders these ordinary stores before later bulk copies into the same bytes.
#pragma unroll
          for (int ch = 0; ch < kCPR; ++ch)
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(dst + ch * 16), "r"(0) : "memory");
          sm90::fence_proxy_async_smem();
          sm90::mbar_arrive(bar);
        }
      }
#endif
    } else {
      if (tile < tile_end) {
#pragma unroll
        for (int it = 0; it < Tr::kRowsPerThread; ++it) {
          const int r = r0 + it * Tr::kRowStep;
          const int pos = tile * kBlockN + r;
          const bool valid = page[it] >= 0;
          const int row = pages.row_of(pos, pages.page_of(pos));
          const T* ksrc = valid ? k_base + page[it] * p.k_page_stride + row * p.k_row_stride + c : k_base;
          const T* vsrc = valid ? v_base + page[it] * p.v_page_stride + row * p.v_row_stride + c : v_base;
          cp_async_16(KVTile::addr(sK, r, c), ksrc, valid);  // invalid rows are zero-filled
          cp_async_16(KVTile::addr(sV, r, c), vsrc, valid);
        }
      }
      cp_async_commit();
    }
  };
  // L2 prefetch (kPrefetch > 0): thread tid asks for row tid % kBlockN of K (tid < kBlockN) or V of a tile
  // kPrefetch tiles beyond the ring's newest; its page is read one iteration ahead, like the ring's.
  const int pf_row = tid % kBlockN;
  const bool pf_v = tid >= kBlockN;
  auto fetch_pf_page = [&](int tile) {
    const int pos = tile * kBlockN + pf_row;
    return tile < tile_end && pos < seqlen_k ? kvcache_physical_page(p, b, pages.page_of(pos)) : -1;
  };
  auto prefetch_tile = [&](int tile, int page) {
    if (page >= 0) {
      const int pos = tile * kBlockN + pf_row;
      const int row = pages.row_of(pos, pages.page_of(pos));
      l2_prefetch(pf_v ? v_base + page * p.v_page_stride + row * p.v_row_stride
                       : k_base + page * p.k_page_stride + row * p.k_row_stride,
                  Tr::kRowBytes);
    }
  };

  // Until tile j (in ring stage j % kStages) has landed, for this thread (cp.async: one group per tile, the
  // kStages - 1 younger ones may still be in flight) or for all (bulk).
  auto wait_tile = [&](int j) {
    if constexpr (Tr::kBulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      sm90::mbar_wait(bars + j % kStages, (j / kStages) & 1);
#endif
    } else {
      cp_async_wait<kStages - 1>();
    }
  };

  // Per thread: O rows (g, g + 8) of the m-tile, for this warp's keys; their softmax states.
  float acc_o[kDT][4];
  zero_acc(acc_o);
  SoftmaxState state[2];
  state[0].init();
  state[1].init();
  int qi[2];  // query row of packed rows g and g + 8 (past the end for padding rows, which are never written)
  qi[0] = (mr0 + g) / group;
  qi[1] = (mr0 + g + 8) / group;
  const int qpos[2] = {kvcache_row_pos(p, mask, b, qi[0]), kvcache_row_pos(p, mask, b, qi[1])};

  if constexpr (Tr::kBulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) sm90::mbar_init(bars + s, Tr::kThreads);
      sm90::mbar_fence_init();
    }
    __syncthreads();  // the barriers are initialised before any thread arrives on them
#else
    __trap();  // bulk variants are launched only on sm_90 (decode_launch.cuh)
#endif
  }
  int page_next[Tr::kRowsPerThread];  // pages of the next tile to copy
  [[maybe_unused]] int page_pf = -1;   // page of this thread's row of the next tile to prefetch into L2
  if (n_tiles > 0) {
    // Q rows of the block (zero-filled past the end), then the first kStages tiles: the whole ring.
    for (int ch = tid; ch < kBlockM * kCPR; ch += Tr::kThreads) {
      const int rr = ch / kCPR, cq = (ch % kCPR) * 8;
      const int r = mr0 + rr;
      const bool valid = r < rows;
      const int i = r / group, h = hk * group + r % group;
      const T* src = seq.q_side(static_cast<const T*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride, h) +
                     i * p.q_row_stride + cq;
      cp_async_16(QTile::addr(sQ, rr, cq), valid ? src : static_cast<const T*>(p.q), valid);
    }
    cp_async_commit();
    {
      int first[kStages][Tr::kRowsPerThread];  // every table read of the ring first: one latency, not kStages
#pragma unroll
      for (int s = 0; s < kStages; ++s) fetch_pages(tile_begin + s, first[s]);
#pragma unroll
      for (int s = 0; s < kStages; ++s) load_tile(s, tile_begin + s, first[s]);
    }
    fetch_pages(tile_begin + kStages, page_next);
    if constexpr (Tr::kPrefetch > 0) {
      int pf_first[Tr::kPrefetch];
#pragma unroll
      for (int a = 0; a < Tr::kPrefetch; ++a) pf_first[a] = fetch_pf_page(tile_begin + kStages + a);
#pragma unroll
      for (int a = 0; a < Tr::kPrefetch; ++a) prefetch_tile(tile_begin + kStages + a, pf_first[a]);
      page_pf = fetch_pf_page(tile_begin + kStages + Tr::kPrefetch);
    }
    if constexpr (Tr::kBulk) cp_async_wait<0>();  // the Q group (the only cp.async group)
    else cp_async_wait<kStages>();                // the Q group (oldest) has landed
    __syncthreads();
  }
  // Q stays in registers for the whole key loop: A operands of every k16 step of S = Q K^T.
  uint32_t qa[kD / 16][4];
  if (n_tiles > 0) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) load_a<QTile>(qa[kk], sQ, 0, kk * 16, lane);
  }

  int stage = 0;
  for (int j = 0; j < n_tiles; ++j, stage = stage + 1 == kStages ? 0 : stage + 1) {
    const int tile = tile_begin + j;
    // Tile j has landed and is visible to every warp: the stage's mbarrier phase (bulk), or this thread's
    // cp.async groups up to tile j's (the kStages - 1 later tiles may still be in flight) then a barrier.
    wait_tile(j);
    if constexpr (!Tr::kBulk) __syncthreads();
    const uint32_t sK = sRing + 2 * stage * KVTile::kBytes, sV = sK + KVTile::kBytes;
    static_assert(kWarpN == 16, "decode_key16_step takes 16 keys per warp");
    const int wrow = warp * kWarpN;  // this warp's first key row in the tile
    decode_key16_step<T, KVTile>(acc_o, state, one_mtile(qa), sK, sV, wrow, tile * kBlockN + wrow, mask, pos_range,
                                 qpos, p.scale_log2, lane);
    // Every warp is done with this stage: refill it at once with tile j + kStages (pages read one iteration
    // ago), so the whole ring is in flight while the block waits for tile j + 1; then read the pages of the
    // tile after that under the next tile's math.
    __syncthreads();
    load_tile(stage, tile + kStages, page_next);
    fetch_pages(tile + kStages + 1, page_next);
    if constexpr (Tr::kPrefetch > 0) {
      prefetch_tile(tile + kStages + Tr::kPrefetch, page_pf);
      page_pf = fetch_pf_page(tile + kStages + Tr::kPrefetch + 1);
    }
  }
  if constexpr (!Tr::kBulk) cp_async_wait<0>();  // (bulk: every copy issued was waited for in the loop)
  __syncthreads();  // the ring is free: reuse it to merge the warps' partial results

  float* sO = reinterpret_cast<float*>(smem + Tr::kBarBytes + QTile::kBytes);  // [warp][row][kOPitch]
  float* sM = sO + kWarps * kBlockM * Tr::kOPitch;              // [warp][row]
  float* sL = sM + kWarps * kBlockM;
  stage_acc_f32(sO + warp * kBlockM * Tr::kOPitch, Tr::kOPitch, acc_o, lane);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    SoftmaxState& st = state[half];
    st.l += __shfl_xor_sync(0xffffffff, st.l, 1);
    st.l += __shfl_xor_sync(0xffffffff, st.l, 2);
    const int rr = g + half * 8;
    if (t == 0) {
      sM[warp * kBlockM + rr] = st.m;
      sL[warp * kBlockM + rr] = st.l;
    }
  }
  __syncthreads();

  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  for (int idx = tid; idx < kBlockM * (kD / 4); idx += Tr::kThreads) {
    const int rr = idx / (kD / 4), c = (idx % (kD / 4)) * 4;
    const int r = mr0 + rr;
    if (r >= rows) continue;
    SoftmaxState st;
    st.init();
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {  // fixed order: deterministic
      const SoftmaxState sw{sM[w * kBlockM + rr], sL[w * kBlockM + rr]};
      float fa, fb;
      st.merge(sw, fa, fb);
      const float4 v = *reinterpret_cast<const float4*>(sO + (w * kBlockM + rr) * Tr::kOPitch + c);
      acc.x = acc.x * fa + v.x * fb;
      acc.y = acc.y * fa + v.y * fb;
      acc.z = acc.z * fa + v.z * fb;
      acc.w = acc.w * fa + v.w * fb;
    }
    const float inv = st.inv_sum();
    const int i = r / group, h = hk * group + r % group;
    const int64_t out_row = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
    if (p.num_splits == 1) {
      T* o = seq.q_side(static_cast<T*>(p.o),
                        p.o_batch_stride, p.o_head_stride, p.o_row_stride, h) + i * p.o_row_stride + c;
      uint2 packed;
      packed.x = pack2<T>(acc.x * inv, acc.y * inv);
      packed.y = pack2<T>(acc.z * inv, acc.w * inv);
      *reinterpret_cast<uint2*>(o) = packed;
      if (c == 0) p.lse[out_row] = st.lse();
    } else {
      const int64_t ws_row = split * total_rows + out_row;
      *reinterpret_cast<float4*>(p.ws_o + ws_row * kD + c) =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (c == 0) p.ws_lse[ws_row] = st.lse();
    }
  }
}

}  // namespace fae
