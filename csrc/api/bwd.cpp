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

namespace {

void fill_grad_strides(int64_t& bs, int64_t& hs, int64_t& rs, const at::Tensor& t) {
  bs = t.stride(0);
  hs = t.stride(1);
  rs = t.stride(2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out_in,
                                                   const at::Tensor& lse_in, double scale, int64_t window_left,
                                                   int64_t window_right, bool deterministic,
                                                   const std::optional<at::Tensor>& dlse_in) {
  check_qkv(q, k, v);
  check_like_q(dout_in, q, "dout");
  check_like_q(out_in, q, "out");
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "flashattn_ext: scale must be a positive finite number");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "flashattn_ext: window entries must be >= -1");
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  if (q.numel() == 0 || k.numel() == 0) {  // no query rows or no keys: every gradient is zero (or empty)
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor dout = with_kernel_layout(dout_in), out = with_kernel_layout(out_in);
  const at::Tensor lse = per_row_float(lse_in, q, "lse");
  at::Tensor dlse;
  if (dlse_in.has_value() && dlse_in->defined()) dlse = per_row_float(*dlse_in, q, "dlse");

  const int64_t Sq_r = (Sq + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({B, Hq, Sq_r}, f32), lse_log2 = at::empty({B, Hq, Sq_r}, f32);
  at::Tensor dq_accum;  // zeroed by the preprocess kernel
  if (!deterministic) dq_accum = at::empty({B, Hq, Sq_r, D}, f32);

  BwdParams p{};
  fill_qkv_params(p, q, k, v);
  p.o = const_cast<void*>(out.data_ptr());
  fill_grad_strides(p.o_batch_stride, p.o_head_stride, p.o_row_stride, out);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, Sk + Sq));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, Sk + Sq));
  p.dout = dout.data_ptr();
  fill_grad_strides(p.do_batch_stride, p.do_head_stride, p.do_row_stride, dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  fill_grad_strides(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, dq);
  fill_grad_strides(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, dk);
  fill_grad_strides(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, dv);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
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
