// Host side: the TMA tensor maps of the Hopper kernels' operands, for a padded batch or packed sequences
// (varlen: cu_seqlens set; fa3/seq.cuh gives the matching coordinates in the kernels).
#pragma once
#include <cstdint>
#include "../../common/params.h"
#include "../../sm90/tma.h"

namespace fae::fa3 {

// A query-side operand (q, dO): padded (B, Hq, Sq, D) or packed (total_q, Hq, D); boxes of box_rows rows.
inline CUtensorMap q_side_tmap(const QkvParams& p, const void* base, bool bf16, int head_dim, int64_t batch_stride,
                               int64_t head_stride, int64_t row_stride, int box_rows) {
  if (p.cu_seqlens_q != nullptr)
    return sm90::make_packed_tmap(base, bf16, p.total_q, p.heads_q, head_dim, head_stride, row_stride, box_rows);
  return sm90::make_bhsd_tmap(base, bf16, p.batch, p.heads_q, p.seqlen_q, head_dim, batch_stride, head_stride,
                              row_stride, box_rows);
}

// A key-side operand (k, v): padded (B, Hkv, Sk, D) or packed (total_k, Hkv, D).
inline CUtensorMap k_side_tmap(const QkvParams& p, const void* base, bool bf16, int head_dim, int64_t batch_stride,
                               int64_t head_stride, int64_t row_stride, int box_rows) {
  if (p.cu_seqlens_k != nullptr)
    return sm90::make_packed_tmap(base, bf16, p.total_k, p.heads_kv, head_dim, head_stride, row_stride, box_rows);
  return sm90::make_bhsd_tmap(base, bf16, p.batch, p.heads_kv, p.seqlen_k, head_dim, batch_stride, head_stride,
                              row_stride, box_rows);
}

// The gathered global keys or values (FwdParams::global_k / global_v): contiguous (B, Hkv, num_global, D).
inline CUtensorMap global_key_tmap(const FwdParams& p, const void* base, bool bf16, int head_dim, int box_rows) {
  const int64_t rows = p.num_global;
  return sm90::make_bhsd_tmap(base, bf16, p.batch, p.heads_kv, rows, head_dim, p.heads_kv * rows * head_dim,
                              rows * head_dim, head_dim, box_rows);
}

}  // namespace fae::fa3
