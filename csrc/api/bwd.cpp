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

// dO comes from autograd with whatever strides the next op produced (expand, transpose, slicing). The kernels
// take any strides the forward accepts; anything else (last dim strided, strides not multiples of 8 elements,
// misaligned view) is copied to a fresh contiguous tensor, only then.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 || t.size(3) == 1;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();  // a contiguous but misaligned view needs a real copy
}

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "flashattn_ext: ", name, " must be on q's device");
  TORCH_CHECK(t.sizes() == q.sizes(), "flashattn_ext: ", name, " shape ", shape(t.sizes()), " != q shape ", shape(q.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flashattn_ext: ", name, " dtype must equal q's");
}

at::Tensor row_tensor(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "flashattn_ext: ", name, " must be on q's device");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
              "flashattn_ext: ", name, " must have shape (batch, heads_q, seqlen_q), got ", shape(t.sizes()));
  return t.to(at::kFloat).contiguous();
}

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
  const at::Tensor dout = kernel_layout(dout_in), out = kernel_layout(out_in);
  const at::Tensor lse = row_tensor(lse_in, q, "lse");
  at::Tensor dlse;
  if (dlse_in.has_value() && dlse_in->defined()) dlse = row_tensor(*dlse_in, q, "dlse");

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
