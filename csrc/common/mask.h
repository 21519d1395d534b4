// Which keys a query row sees. One rule for causal and sliding windows: query row i sits at key position
// p = i + seqlen_k - seqlen_q (bottom-right aligned, as flash-attn) and sees key j iff
//   j < seqlen_k  and  (left < 0 or j >= p - left)  and  (right < 0 or j <= p + right).
// causal is window (-1, 0). This is the mask policy of every kernel: the key range a query tile may see
// (key_begin / key_end, and the mirror query_begin / query_end), and per tile whether it can be skipped, needs no
// per-element mask, or needs one (classify).
#pragma once
#include "seqlen.h"

namespace fae {

enum class TileKind { kSkip, kFull, kPartial };

struct WindowMask {
  int seqlen_q, seqlen_k, left, right;

  // The mask of sequence `seq` under the window of params p (FwdParams and everything derived from it).
  template <typename Params>
  __host__ __device__ __forceinline__ static WindowMask of(const Params& p, const SeqInfo& seq) {
    return WindowMask{seq.seqlen_q, seq.seqlen_k, p.window_left, p.window_right};
  }

  __host__ __device__ __forceinline__ int pos(int row) const { return row + seqlen_k - seqlen_q; }

  __host__ __device__ __forceinline__ bool visible(int row, int col) const { return visible_at(pos(row), col); }
  // The same rule for a query at key position p given explicitly (a row whose position is not pos(row): the
  // decode kernels' per-row positions, KvCacheParams::q_pos).
  __host__ __device__ __forceinline__ bool visible_at(int p, int col) const {
    // Bitwise & keeps this branch-free in the per-element masking loop.
    return (col < seqlen_k) & (left < 0 || col >= p - left) & (right < 0 || col <= p + right);
  }

  // Longformer global key at position g (-1: padding) as counted by query row `row` on top of its window: only
  // where the window does not already count it (a global key inside the window is counted once, there) and,
  // when the global tokens are causal, only g <= the row's position.
  __host__ __device__ __forceinline__ bool counts_global(int row, int g, bool causal) const {
    return (g >= 0) & !visible(row, g) & (!causal || g <= pos(row));
  }

  // Key range [begin, end) that any of rows [row0, row1) may see; end <= begin means nothing.
  __host__ __device__ __forceinline__ int key_begin(int row0) const { return key_begin_at(pos(row0)); }
  __host__ __device__ __forceinline__ int key_end(int row1) const { return key_end_at(pos(row1 - 1)); }
  // ... of queries at key positions p_first <= ... <= p_last (positions given explicitly).
  __host__ __device__ __forceinline__ int key_begin_at(int p_first) const {
    if (left < 0) return 0;
    const int b = p_first - left;
    return b > 0 ? b : 0;
  }
  __host__ __device__ __forceinline__ int key_end_at(int p_last) const {
    if (right < 0) return seqlen_k;
    const int e = p_last + right + 1;
    return e < seqlen_k ? e : seqlen_k;
  }

  // Query range [begin, end) whose rows may see some key in [col0, col1) (col1 <= seqlen_k); the mirror of
  // key_begin/key_end, used by the backward, which loops over queries for a fixed key tile.
  __host__ __device__ __forceinline__ int query_begin(int col0) const {
    if (right < 0) return 0;
    const int b = col0 - right - (seqlen_k - seqlen_q);  // first row with p + right >= col0
    return b > 0 ? b : 0;
  }
  __host__ __device__ __forceinline__ int query_end(int col1) const {
    if (left < 0) return seqlen_q;
    const int e = col1 + left - (seqlen_k - seqlen_q);  // one past the last row with p - left <= col1 - 1
    return e < seqlen_q ? e : seqlen_q;
  }

  // True when every row in [row0, row1) sees every key in [col0, col1): the tile needs no masking.
  __host__ __device__ __forceinline__ bool tile_fully_visible(int row0, int row1, int col0, int col1) const {
    return tile_fully_visible_at(pos(row0), pos(row1 - 1), col0, col1);
  }
  // ... for queries at key positions p_first <= ... <= p_last.
  __host__ __device__ __forceinline__ bool tile_fully_visible_at(int p_first, int p_last, int col0, int col1) const {
    if (col1 > seqlen_k) return false;
    if (left >= 0 && col0 < p_last - left) return false;
    if (right >= 0 && col1 - 1 > p_first + right) return false;
    return true;
  }

  // Rows [row0, row1) x keys [col0, col1): kSkip when the keys lie outside every row's range (conservative: a
  // band can still leave a kPartial tile empty, which the per-element mask then handles), kFull when no element
  // needs masking, else kPartial.
  __host__ __device__ __forceinline__ TileKind classify(int row0, int row1, int col0, int col1) const {
    if (col0 >= key_end(row1) || col1 <= key_begin(row0)) return TileKind::kSkip;
    return tile_fully_visible(row0, row1, col0, col1) ? TileKind::kFull : TileKind::kPartial;
  }
};

}  // namespace fae
