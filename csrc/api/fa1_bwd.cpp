// flashattn_ext::fa1_bwd: gradients of flashattn_ext::fa1_fwd by the FlashAttention-1 backward (Algorithm 4).
// Registered here (TORCH_LIBRARY_FRAGMENT) so bindings.cpp stays untouched; autograd in flashattn_ext/_ops_fa1.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cmath>
#include <optional>
#include "../include/params.h"
#include "../include/switch.h"
#include "api_common.h"

namespace fae {

template <typename T, int kHeadDim>
void run_fa1_bwd(const Fa1BwdParams& params, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fa1_bwd(const at::Tensor& dout_in, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out_in, const at::Tensor& lse_in,
                                                       double scale, int64_t window_left, int64_t window_right,
                                                       const std::optional<at::Tensor>& dlse_in) {
  check_qkv(q, k, v);
  check_like_q(dout_in, q, "dout");
  check_like_q(out_in, q, "out");
  check_scale_and_window(scale, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  if (q.numel() == 0 || k.numel() == 0) {  // no query rows or no keys: every gradient is zero (or empty)
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const BackwardInputs in = backward_inputs(dout_in, out_in, lse_in, dlse_in, q);
  const at::Tensor &dout = in.dout, &out = in.out, &lse = in.lse, &dlse = in.dlse;

  const auto f32 = q.options().dtype(at::kFloat);
  // FA1's dQ round trip between K/V tiles; never read before the kernel writes it, so no memset.
  at::Tensor dq_accum = at::empty({B, Hq, Sq, D}, f32);
  // GQA: the group's query heads (separate blocks) add their dK/dV into zeroed fp32 buffers.
  const bool gqa = Hq != Hkv;
  at::Tensor dk_accum, dv_accum;
  if (gqa) {
    dk_accum = at::zeros({B, Hkv, Sk, D}, f32);
    dv_accum = at::zeros({B, Hkv, Sk, D}, f32);
  }

  Fa1BwdParams p{};
  fill_qkv_params(p, q, k, v);
  fill_output_params(p, out, lse, scale);
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, Sk + Sq));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, Sk + Sq));
  fill_grad_params(p, dout, dlse, dq, dk, dv);
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk_accum = gqa ? dk_accum.data_ptr<float>() : nullptr;
  p.dv_accum = gqa ? dv_accum.data_ptr<float>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(static_cast<int>(D), kHeadDim, [&] { run_fa1_bwd<T, kHeadDim>(p, stream); });
  });
  if (gqa) {  // already scaled by the kernel; copy_ converts to the dtype and k's / v's layout
    dk.copy_(dk_accum);
    dv.copy_(dv_accum);
  }
  return {dq, dk, dv};
}

}  // namespace fae

TORCH_LIBRARY_FRAGMENT(flashattn_ext, m) {
  m.def(
      "fa1_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, int window_left, "
      "int window_right, Tensor? dlse=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) { m.impl("fa1_bwd", &fae::fa1_bwd); }
