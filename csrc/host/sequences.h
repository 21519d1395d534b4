// The sequence part of the fwd / bwd ops: a padded batch (q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D)) or packed
// variable-length sequences (q (total_q, Hq, D), k/v (total_k, Hkv, D) with cu_seqlens_q/k (B + 1,) int32 prefix
// sums on q's device and max_seqlen_q/k sizing the grids). Checks either form, then fills the QkvParams sequence
// part that SeqInfo (csrc/common/seqlen.h) reads. cu_seqlens are never read on the host: what needs their values
// (cu_seqlens[0] == 0, monotone, cu_seqlens[-1] == total, every length <= max_seqlen) is the caller's contract,
// checked by flashattn_ext.attention_varlen's CPU path only (docs/api.md).
#pragma once
#include <ATen/ATen.h>
#include <limits>
#include <optional>
#include <utility>
#include <vector>
#include "checks.h"

namespace fae {

struct Sequences {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // varlen: max_seqlen_q / max_seqlen_k
  int64_t total_q = 0, total_k = 0;              // rows of q / k (varlen); batch * seqlen (padded)
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
};

inline void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, ".dtype must be int32, got ", dtype_name(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.device() == q.device(), name, " must be on q's device (", q.device().str(), "), got ",
                    cu.device().str());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D of length batch + 1 >= 1, got shape ",
                    shape(cu.sizes()));
  TORCH_CHECK_VALUE(cu.stride(0) == 1 || cu.size(0) == 1, name, " must be contiguous; call ", name, ".contiguous()");
}

// max_seqlen sizes the grid: it must be >= every length. Without reading cu_seqlens the one check possible is
// batch * max_seqlen >= total (otherwise some sequence is longer than max_seqlen).
inline void check_max_seqlen(int64_t max_seqlen, const char* name, int64_t batch, int64_t total) {
  TORCH_CHECK_VALUE(max_seqlen >= 0, name, " must be >= 0, got ", num(max_seqlen));
  TORCH_CHECK_VALUE(batch * max_seqlen >= total, name, "=", num(max_seqlen), " is too small: ", num(batch),
                    " sequences of at most ", num(max_seqlen), " rows cannot hold the ", num(total),
                    " packed rows; pass the longest sequence's length");
  TORCH_CHECK_VALUE(max_seqlen < std::numeric_limits<int>::max(), name, " must be < 2**31 - 1, got ",
                    num(max_seqlen));
}

// Packed q (total_q, Hq, D), k/v (total_k, Hkv, D): check_qkv's checks for the 3-D form, plus the sequence part.
inline Sequences check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got one on ", q.device().str());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
    TORCH_CHECK_VALUE(t.device() == q.device(), "q, k, v must be on the same device: q is on ", q.device().str(),
                      ", ", name, " is on ", t.device().str());
    TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (total_rows, heads, head_dim) for varlen, got shape ",
                      shape(t.sizes()));
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", shape(k.sizes()), " and v ",
                    shape(v.sizes()));
  check_heads_dtypes_and_build(q, k, v);
  check_cu_seqlens(cu_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_k, "cu_seqlens_k", q);
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), "cu_seqlens_q and cu_seqlens_k must have the same length "
                    "(batch + 1), got ", num(cu_q.size(0)), " and ", num(cu_k.size(0)));
  Sequences s;
  s.varlen = true;
  s.batch = cu_q.size(0) - 1;
  s.total_q = q.size(0);
  s.total_k = k.size(0);
  check_max_seqlen(max_seqlen_q, "max_seqlen_q", s.batch, s.total_q);
  check_max_seqlen(max_seqlen_k, "max_seqlen_k", s.batch, s.total_k);
  s.seqlen_q = max_seqlen_q;
  s.seqlen_k = max_seqlen_k;
  s.cu_seqlens_q = cu_q.data_ptr<int>();
  s.cu_seqlens_k = cu_k.data_ptr<int>();
  if (q.numel() == 0 || k.numel() == 0) return s;  // nothing is read: no kernel launch
  const int64_t int_max = std::numeric_limits<int>::max();  // rows and (batch, head) pairs are 32-bit indices
  TORCH_CHECK_VALUE(s.total_q < int_max && s.total_k < int_max && s.batch * q.size(1) < int_max, "q ",
                    shape(q.sizes()), " / k ", shape(k.sizes()), ": total rows and batch * heads must be < 2**31 - 1");
  check_row_layout(q, "q");
  check_row_layout(k, "k");
  check_row_layout(v, "v");
  return s;
}

// The sequence form of an op call: padded when both cu_seqlens are absent, varlen when both are given.
inline Sequences check_sequences(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const bool has_q = cu_q.has_value() && cu_q->defined(), has_k = cu_k.has_value() && cu_k->defined();
  TORCH_CHECK_VALUE(has_q == has_k, "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all");
  if (has_q) return check_varlen(q, k, v, *cu_q, *cu_k, max_seqlen_q, max_seqlen_k);
  check_qkv(q, k, v);
  Sequences s;
  s.batch = q.size(0);
  s.seqlen_q = q.size(2);
  s.seqlen_k = k.size(2);
  s.total_q = s.batch * s.seqlen_q;
  s.total_k = s.batch * s.seqlen_k;
  return s;
}

// QkvParams from q/k/v in either form: the row dim is 2 of (B, H, S, D) or 0 of (total, H, D); heads are dim 1.
inline void fill_qkv_params(QkvParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const Sequences& s) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = batch_stride(q), p.q_head_stride = q.stride(1), p.q_row_stride = row_stride(q);
  p.k_batch_stride = batch_stride(k), p.k_head_stride = k.stride(1), p.k_row_stride = row_stride(k);
  p.v_batch_stride = batch_stride(v), p.v_head_stride = v.stride(1), p.v_row_stride = row_stride(v);
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.head_group = p.heads_q / p.heads_kv;
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.head_dim = static_cast<int>(q.size(-1));
  p.cu_seqlens_q = s.cu_seqlens_q;
  p.cu_seqlens_k = s.cu_seqlens_k;
  p.seqused_k = nullptr;
  p.total_q = s.varlen ? static_cast<int>(s.total_q) : 0;
  p.total_k = s.varlen ? static_cast<int>(s.total_k) : 0;
}

// lse / dlse: (batch, heads_q, seqlen_q) padded, (heads_q, total_q) varlen.
inline std::vector<int64_t> lse_shape(const at::Tensor& q, const Sequences& s) {
  if (s.varlen) return {q.size(1), s.total_q};
  return {q.size(0), q.size(1), q.size(2)};
}

}  // namespace fae
