// flashattn_ext::bwd: gradients of flashattn_ext::fwd. Tensor checks -> BwdParams -> dispatch. Registered here
// with TORCH_LIBRARY_FRAGMENT so the op lives next to its implementation.
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
void run_fa2_bwd(const BwdParams& params, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out_in,
                                                   const at::Tensor& lse_in, double scale, int64_t window_left,
                                                   int64_t window_right, bool deterministic,
                                                   const std::optional<at::Tensor>& dlse_in) {
  check_qkv(q, k, v);
  check_like_q(dout_in, q, "dout");
  check_like_q(out_in, q, "out");
  check_scale_and_window(scale, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  if (q.numel() == 0 || k.numel() == 0) {  // no query rows or no keys: every gradient is zero (or empty)
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const BackwardInputs in = backward_inputs(dout_in, out_in, lse_in, dlse_in, q);
  const at::Tensor &dout = in.dout, &out = in.out, &lse = in.lse, &dlse = in.dlse;

  const int64_t Sq_r = (Sq + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({B, Hq, Sq_r}, f32), lse_log2 = at::empty({B, Hq, Sq_r}, f32);
  at::Tensor dq_accum;  // zeroed by the preprocess kernel
  if (!deterministic) dq_accum = at::empty({B, Hq, Sq_r, D}, f32);

  BwdParams p{};
  fill_qkv_params(p, q, k, v);
  fill_output_params(p, out, lse, scale);
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, Sk + Sq));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, Sk + Sq));
  fill_grad_params(p, dout, dlse, dq, dk, dv);
  p.dsoftmax_sum = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.seqlen_q_rounded = static_cast<int>(Sq_r);
  p.deterministic = deterministic;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(static_cast<int>(D), kHeadDim, [&] { run_fa2_bwd<T, kHeadDim>(p, stream); });
  });
  return {dq, dk, dv};
}

}  // namespace fae

TORCH_LIBRARY_FRAGMENT(flashattn_ext, m) {
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, int window_left, "
      "int window_right, bool deterministic, Tensor? dlse=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) { m.impl("bwd", &fae::bwd); }
