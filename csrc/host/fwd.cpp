// flashattn_ext::fwd and fwd_global: argument checks -> FwdParams -> the family chosen by dispatch.cpp. Empty
// inputs are answered here without a launch (out 0, lse -inf for rows that see no key), for every family. Padded
// and varlen calls differ only in the checks and the params' sequence part (sequences.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cmath>
#include "checks.h"
#include "dispatch.h"
#include "ops.h"
#include "sequences.h"

namespace fae {
namespace {

// The outputs of a checked forward call and its params, or (launch false) the answer without a kernel: no row,
// or no key (out 0, lse -inf).
struct ForwardCall {
  at::Tensor out, lse;
  FwdParams params{};
  bool launch = false;
};

ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Sequences& seqs,
                            double scale, int64_t window_left, int64_t window_right) {
  ForwardCall call;
  call.out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  call.lse = at::empty(lse_shape(q, seqs), q.options().dtype(at::kFloat));
  if (call.out.numel() == 0) return call;
  if (seqs.total_k == 0 || seqs.seqlen_k == 0) {  // no keys: every row sees nothing
    call.out.zero_();
    call.lse.fill_(-INFINITY);
    return call;
  }
  FwdParams& p = call.params;
  fill_qkv_params(p, q, k, v, seqs);
  fill_output_params(p, call.out, call.lse, scale);
  p.window_left = window_bound(window_left, seqs.seqlen_k);
  p.window_right = window_bound(window_right, seqs.seqlen_q);
  call.launch = true;
  return call;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       int64_t window_left, int64_t window_right,
                                       bool /*deterministic: used by the backward only*/,
                                       c10::string_view algorithm, const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k) {
  const Sequences seqs = check_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_scale_and_window(scale, window_left, window_right);
  const Family family = choose_family(algorithm, device_arch(q.get_device()), Direction::kFwd,
                                      static_cast<int>(q.size(-1)), seqs.varlen);
  const c10::cuda::CUDAGuard guard(q.device());
  ForwardCall call = prepare_forward(q, k, v, seqs, scale, window_left, window_right);
  if (call.launch) run_fwd(family, call.params, q, c10::cuda::getCurrentCUDAStream());
  return {call.out, call.lse};
}

// fwd (padded, self-attention) with the Longformer global keys counted in the kernel as extra key tiles
// (FwdParams::global_*): every row's window plus the global keys its window leaves out. Hopper family only;
// flashattn_ext/global_tokens.py gathers global_k/v, merges in the global rows' other keys and owns the autograd
// (this op has none). global_pos values are only compared in the kernel's mask, never used as addresses.
std::tuple<at::Tensor, at::Tensor> fwd_global(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& global_k, const at::Tensor& global_v,
                                              const at::Tensor& global_pos, double scale, int64_t window_left,
                                              int64_t window_right, bool global_causal,
                                              c10::string_view algorithm) {
  const Sequences seqs = check_sequences(q, k, v, std::nullopt, std::nullopt, 0, 0);
  check_scale_and_window(scale, window_left, window_right);
  TORCH_CHECK_VALUE(seqs.seqlen_q == seqs.seqlen_k, "global keys need self-attention (Sq == Sk), got q ",
                    shape(q.sizes()), " and k ", shape(k.sizes()));
  const Family family = choose_family(algorithm, device_arch(q.get_device()), Direction::kFwd,
                                      static_cast<int>(q.size(-1)));
  TORCH_CHECK_VALUE(family == Family::kFa3, "algorithm='", std::string(algorithm), "' runs the ",
                    family_name(family), " family here; global keys in the kernel need the Hopper family (fa3)");
  const int64_t B = q.size(0), Hkv = k.size(1), D = q.size(3);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{global_k, "global_k"}, {global_v, "global_v"}}) {
    check_kernel_dtype(t, name, q);
    TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device (", q.device().str(), "), got ",
                      t.device().str());
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == B && t.size(1) == Hkv && t.size(3) == D, name,
                      " must have shape (batch, heads_kv, num_global, head_dim) = (", num(B), ", ", num(Hkv),
                      ", G, ", num(D), "), got ", shape(t.sizes()));
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous; call ", name, ".contiguous()");
  }
  const int64_t G = global_k.size(2);
  TORCH_CHECK_VALUE(global_v.size(2) == G, "global_k and global_v must have the same shape, got ",
                    shape(global_k.sizes()), " and ", shape(global_v.sizes()));
  TORCH_CHECK_TYPE(global_pos.scalar_type() == at::kInt, "global_pos.dtype must be int32, got ",
                   dtype_name(global_pos.scalar_type()));
  TORCH_CHECK_VALUE(global_pos.device() == q.device() && global_pos.dim() == 2 && global_pos.size(0) == B &&
                        global_pos.size(1) == G && global_pos.is_contiguous(),
                    "global_pos must be a contiguous (batch, num_global) = (", num(B), ", ", num(G),
                    ") tensor on q's device, got shape ", shape(global_pos.sizes()), " on ",
                    global_pos.device().str());
  const c10::cuda::CUDAGuard guard(q.device());
  ForwardCall call = prepare_forward(q, k, v, seqs, scale, window_left, window_right);
  if (!call.launch) return {call.out, call.lse};
  FwdParams& p = call.params;
  if (G > 0) {
    p.global_k = global_k.data_ptr();
    p.global_v = global_v.data_ptr();
    p.global_pos = global_pos.data_ptr<int>();
    p.num_global = static_cast<int>(G);
    p.global_causal = global_causal;
  }
  run_fwd(family, p, q, c10::cuda::getCurrentCUDAStream());
  return {call.out, call.lse};
}

}  // namespace fae
