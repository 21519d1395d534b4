// Shared checks and params filling for the C++ op entry points.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <cuda_runtime_api.h>
#include <limits>
#include <optional>
#include "../include/error_text.h"
#include "../include/params.h"

namespace fae {

inline void check_attn_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "flashattn_ext: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, "flashattn_ext: ", name, " must have 4 dims (batch, heads, seq, head_dim), got ", num(t.dim()));
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "flashattn_ext: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "flashattn_ext: ", name, " must have a contiguous last dim");
  // cp.async moves 16-byte chunks: rows, heads and batches must start on 16-byte boundaries.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "flashattn_ext: ", name,
              " data pointer must be 16-byte aligned");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, "flashattn_ext: ", name, ".stride(", num(d),
                ") must be a multiple of 8 elements");
}

// The kernels use sm80 instructions (cp.async, bf16 mma). validate.py raises first in eager mode; this check
// also covers calls traced by torch.compile, where that Python check is skipped.
inline void check_device_arch(const at::Tensor& t) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device());
  TORCH_CHECK(major >= 8, "flashattn_ext: needs a GPU of compute capability 8.0 or newer, got ", num(major), ".x");
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attn_tensor(q, "q");
  check_attn_tensor(k, "k");
  check_attn_tensor(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flashattn_ext: q, k, v must have the same dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flashattn_ext: q, k, v must be on one device");
  TORCH_CHECK(k.sizes() == v.sizes(), "flashattn_ext: k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0), "flashattn_ext: k batch ", num(k.size(0)), " != q batch ", num(q.size(0)));
  TORCH_CHECK(k.size(3) == q.size(3), "flashattn_ext: k head_dim ", num(k.size(3)), " != q head_dim ", num(q.size(3)));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "flashattn_ext: q heads ", num(q.size(1)),
              " must be a multiple of k/v heads ", num(k.size(1)));
  check_device_arch(q);
  const int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(2) < int_max && k.size(2) < int_max && q.size(0) * q.size(1) < int_max,
              "flashattn_ext: sizes exceed the 32-bit index range");
}

inline void fill_qkv_params(QkvParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.head_group = p.heads_q / p.heads_kv;
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
}

// dO (and O) come from autograd with whatever strides the next op produced (expand, transpose, slicing). The
// kernels take any strides the forward accepts; anything else (strided last dim, strides not multiples of 8
// elements, misaligned view) is copied to a fresh contiguous tensor, only then.
inline at::Tensor with_kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 || t.size(3) == 1;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();  // a contiguous but misaligned view needs a real copy
}

inline void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "flashattn_ext: ", name, " must be on q's device");
  TORCH_CHECK(t.sizes() == q.sizes(), "flashattn_ext: ", name, " shape ", shape(t.sizes()), " != q shape ",
              shape(q.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flashattn_ext: ", name, " dtype must equal q's");
}

// A per-row statistic (lse, dlse) as the kernels index it: (batch, heads_q, seqlen_q) fp32 contiguous.
inline at::Tensor per_row_float(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "flashattn_ext: ", name, " must be on q's device");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
              "flashattn_ext: ", name, " must have shape (batch, heads_q, seqlen_q), got ", shape(t.sizes()));
  return t.to(at::kFloat).contiguous();
}

// The saved forward outputs and incoming gradients as both backward kernels read them.
struct BackwardInputs {
  at::Tensor dout, out, lse, dlse;  // dlse undefined when the loss does not use lse
};

inline BackwardInputs backward_inputs(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& dlse, const at::Tensor& q) {
  BackwardInputs in{with_kernel_layout(dout), with_kernel_layout(out), per_row_float(lse, q, "lse"), {}};
  if (dlse.has_value() && dlse->defined()) in.dlse = per_row_float(*dlse, q, "dlse");
  return in;
}

// Output, lse and softmax scale fields shared by every forward-style params struct.
template <typename Params>
void fill_output_params(Params& p, const at::Tensor& out, const at::Tensor& lse, double scale) {
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);  // softmax runs in base 2
}

inline void check_scale_and_window(double scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "flashattn_ext: scale must be a positive finite number");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "flashattn_ext: window entries must be >= -1");
}

// dO, dlse and gradient pointers/strides shared by the FA2 and FA1 backward params structs.
template <typename Params>
void fill_grad_params(Params& p, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& dq,
                      const at::Tensor& dk, const at::Tensor& dv) {
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_head_stride = dout.stride(1), p.do_row_stride = dout.stride(2);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
}

}  // namespace fae
