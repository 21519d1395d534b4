// flashattn_ext::bwd: gradients of flashattn_ext::fwd. Argument checks -> BwdParams -> the family chosen by
// dispatch.cpp (which allocates that family's scratch). Empty inputs give zero gradients without a launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <optional>
#include "checks.h"
#include "dispatch.h"
#include "ops.h"
#include "sequences.h"

namespace fae {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out_in,
                                                   const at::Tensor& lse_in, double scale, int64_t window_left,
                                                   int64_t window_right, bool deterministic,
                                                   const std::optional<at::Tensor>& dlse_in,
                                                   c10::string_view algorithm,
                                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                                   const std::optional<at::Tensor>& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const Sequences seqs = check_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_like_q(dout_in, q, "dout");
  check_like_q(out_in, q, "out");
  check_scale_and_window(scale, window_left, window_right);
  const Family family = choose_family(algorithm, device_arch(q.get_device()), Direction::kBwd,
                                      static_cast<int>(q.size(-1)), seqs.varlen);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0 || seqs.seqlen_q == 0 || seqs.seqlen_k == 0) {
    // no query rows or no keys: every gradient is zero (or empty)
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const std::vector<int64_t> stat_shape = lse_shape(q, seqs);
  const BackwardInputs in = backward_inputs(dout_in, out_in, lse_in, dlse_in, q, stat_shape);

  BwdParams p{};
  fill_qkv_params(p, q, k, v, seqs);
  fill_output_params(p, in.out, in.lse, scale);
  p.window_left = window_bound(window_left, seqs.seqlen_k);
  p.window_right = window_bound(window_right, seqs.seqlen_q);
  fill_grad_params(p, in.dout, in.dlse, dq, dk, dv);
  p.deterministic = deterministic;
  run_bwd(family, p, q, dk, dv, c10::cuda::getCurrentCUDAStream());
  return {dq, dk, dv};
}

}  // namespace fae
