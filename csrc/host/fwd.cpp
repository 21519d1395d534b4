// flashattn_ext::fwd: argument checks -> FwdParams -> the family chosen by dispatch.cpp. Empty inputs are answered
// here without a launch (out 0, lse -inf for rows that see no key), for every family.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cmath>
#include "checks.h"
#include "dispatch.h"
#include "ops.h"

namespace fae {

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       int64_t window_left, int64_t window_right,
                                       bool /*deterministic: used by the backward only*/,
                                       c10::string_view algorithm) {
  check_qkv(q, k, v);
  check_scale_and_window(scale, window_left, window_right);
  const Family family =
      choose_family(algorithm, device_arch(q.get_device()), Direction::kFwd, static_cast<int>(q.size(3)));
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Sk = k.size(2);
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Sk == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }

  FwdParams p{};
  fill_qkv_params(p, q, k, v);
  fill_output_params(p, out, lse, scale);
  p.window_left = window_bound(window_left, Sk);
  p.window_right = window_bound(window_right, Sq);
  run_fwd(family, p, q, c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

}  // namespace fae
