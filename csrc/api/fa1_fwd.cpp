// flashattn_ext::fa1_fwd: the FlashAttention-1 forward, same semantics as flashattn_ext::fwd, kept selectable so
// the two algorithms can be compared. Registered here (TORCH_LIBRARY_FRAGMENT) so bindings.cpp stays untouched.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cmath>
#include "../include/params.h"
#include "../include/switch.h"
#include "api_common.h"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_fwd(const Fa1FwdParams& params, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> fa1_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double scale, int64_t window_left, int64_t window_right) {
  check_qkv(q, k, v);
  check_scale_and_window(scale, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(2);
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Sk == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }

  // FA1's global-memory state between K/V tiles. Never read before the kernel writes it, so no memset.
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o_acc = at::empty({B, Hq, Sq, D}, f32);
  at::Tensor m = at::empty({B, Hq, Sq}, f32);
  at::Tensor l = at::empty({B, Hq, Sq}, f32);

  Fa1FwdParams p{};
  fill_qkv_params(p, q, k, v);
  fill_output_params(p, out, lse, scale);
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, Sk + Sq));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, Sk + Sq));
  p.o_acc = o_acc.data_ptr<float>();
  p.m = m.data_ptr<float>();
  p.l = l.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(static_cast<int>(D), kHeadDim, [&] { run_fa1_fwd<T, kHeadDim>(p, stream); });
  });
  return {out, lse};
}

}  // namespace fae

TORCH_LIBRARY_FRAGMENT(flashattn_ext, m) {
  m.def("fa1_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) { m.impl("fa1_fwd", &fae::fa1_fwd); }
