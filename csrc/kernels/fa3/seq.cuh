// The sequence a Hopper kernel block works on (SeqInfo, csrc/common/seqlen.h) and where its rows are for TMA.
//
// kVarlen is a template argument of the kernels, not a runtime test of cu_seqlens: the padded instantiation
// folds SeqInfo to the padded batch's constants (the kernels compile as they did before varlen), the varlen one
// reads cu_seqlens once per tile.
// The launchers describe a padded (B, H, S, D) tensor to TMA as dims (D, S, H, B) and a packed (total, H, D) one
// as (D, total, H, 1), so row r of sequence b is at TMA coordinates (r, b) padded and (row0 + r, 0) packed. A
// tile that runs past its sequence's end reads the next sequence's rows (zeros past the tensor): the kernels mask
// those keys by the sequence's length and store no query row past it.
#pragma once
#include "../../common/seqlen.h"

namespace fae::fa3 {

template <bool kVarlen, typename Params>
__device__ __forceinline__ SeqInfo sequence(const Params& p, int b) {
  if constexpr (kVarlen) return seq_info(p, b);
  else return SeqInfo(b, p.seqlen_q, p.seqlen_k);
}

// TMA coordinates (row, batch) of row r of a sequence on the query side (q, dO) and the key side (k, v).
struct TmaRow {
  int row, batch;
};
__device__ __forceinline__ TmaRow q_rows(const SeqInfo& s, int r) {
  return s.packed_q ? TmaRow{static_cast<int>(s.q_row0) + r, 0} : TmaRow{r, s.b};
}
__device__ __forceinline__ TmaRow k_rows(const SeqInfo& s, int r) {
  return s.packed_k ? TmaRow{static_cast<int>(s.k_row0) + r, 0} : TmaRow{r, s.b};
}

}  // namespace fae::fa3
