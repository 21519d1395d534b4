// flashattn_ext::fwd: argument checks -> FwdParams -> the family chosen by dispatch.cpp. Empty inputs are answered
// here without a launch (out 0, lse -inf for rows that see no key), for every family. Padded and varlen calls
// differ only in the checks and the params' sequence part (sequences.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cmath>
#include "checks.h"
#include "dispatch.h"
#include "ops.h"
#include "sequences.h"

namespace fae {

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

  at::Tensor out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  at::Tensor lse = at::empty(lse_shape(q, seqs), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (seqs.total_k == 0 || seqs.seqlen_k == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }

  FwdParams p{};
  fill_qkv_params(p, q, k, v, seqs);
  fill_output_params(p, out, lse, scale);
  p.window_left = window_bound(window_left, seqs.seqlen_k);
  p.window_right = window_bound(window_right, seqs.seqlen_q);
  run_fwd(family, p, q, c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

}  // namespace fae
