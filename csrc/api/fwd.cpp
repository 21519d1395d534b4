// flashattn_ext::fwd: tensor checks -> FwdParams -> dispatch to the instantiated kernel. Python's
// validate.py has already raised clear errors for bad input; these checks are the last line of defence.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cmath>
#include "../include/params.h"
#include "../include/switch.h"
#include "api_common.h"

namespace fae {

template <typename T, int kHeadDim>
void run_fa2_fwd(const FwdParams& params, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       double scale, int64_t window_left, int64_t window_right,
                                       bool /*deterministic: used by the backward only*/) {
  check_qkv(q, k, v);
  check_scale_and_window(scale, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
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
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, Sk + Sq));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, Sk + Sq));
  (void)Hkv;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(static_cast<int>(D), kHeadDim, [&] { run_fa2_fwd<T, kHeadDim>(p, stream); });
  });
  return {out, lse};
}

}  // namespace fae
