// Argument checks and params filling shared by the op entry points (fwd.cpp, bwd.cpp, kvcache.cpp).
//
// Every check an attention() call needs on CUDA lives here, once: flashattn_ext/api.py sends CUDA tensors
// straight to the op, so raw-op, torch.compile and eager callers all get these errors. Each is a ValueError
// (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) whose message starts with the argument it is about, worded
// as flashattn_ext/validate.py words the CPU path's checks, so tests can match one message on both devices.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <cuda_runtime_api.h>
#include <limits>
#include <optional>
#include <string>
#include "error_text.h"
#include "../common/params.h"

namespace fae {

// Python's name for a dtype ("float16", not "Half"), as validate.py prints it.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

// Compute capability of a device as major * 10 + minor, read once per device (the attribute query is cheap, but
// this runs on every call).
inline int device_arch(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices && cache[device] != 0) return cache[device];
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const int arch = major * 10 + minor;
  if (device >= 0 && device < kMaxDevices) cache[device] = arch;
  return arch;
}

// The kernels use sm80 instructions (cp.async, bf16 mma.sync).
inline void check_device_arch(const at::Tensor& q) {
  const int arch = device_arch(q.get_device());
  TORCH_CHECK_VALUE(arch >= 80, "q, k, v are on ", q.device().str(), " with compute capability ", num(arch / 10), ".",
                    num(arch % 10), "; flashattn_ext needs compute capability >= 8.0 (Ampere or newer)");
}

// The 16-byte cp.async row loads: contiguous last dim, strides of the stepped-over dims multiples of 8 elements,
// 16-byte aligned data. Size-1 dims are never stepped over, so their stride does not matter.
inline void check_row_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) == 1 || t.stride(-1) == 1, name, " must have a contiguous last dim (stride(-1) == 1), "
                    "got strides ", shape(t.strides()), "; call ", name, ".contiguous()");
  for (int d = 0; d + 1 < t.dim(); ++d)
    TORCH_CHECK_VALUE(t.size(d) <= 1 || t.stride(d) % 8 == 0, name, " strides ", shape(t.strides()),
                      " must be multiples of 8 elements in dims 0-", num(t.dim() - 2), ": each row must start "
                      "16-byte aligned for cp.async; call ", name, ".contiguous()");
  const auto misalign = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16;
  TORCH_CHECK_VALUE(misalign == 0, name, ".data_ptr() must be 16-byte aligned (rows are loaded with 16-byte "
                    "cp.async), got address % 16 == ", num(misalign), " (a view with an odd storage offset?); call ",
                    name, ".clone() (.contiguous() does not copy an already contiguous view)");
}

// A CUDA attention operand in a kernel dtype, 4-D, on `device`.
inline void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(t.device() == q.device(), "q, k, v must be on the same device: q is on ", q.device().str(), ", ",
                    name, " is on ", t.device().str());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch, heads, seqlen, head_dim), got shape ", shape(t.sizes()));
}

inline void check_kernel_dtype(const at::Tensor& t, const char* name, const at::Tensor& q) {
  if (&t == &q) {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                     "q.dtype must be one of ['float16', 'bfloat16'] on CUDA, got ", dtype_name(q.scalar_type()));
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ".dtype (", dtype_name(t.scalar_type()),
                     ") must equal q.dtype (", dtype_name(q.scalar_type()), ")");
  }
}

void check_head_dim_compiled(int64_t head_dim);  // ops.cpp: against the head dims of this build

// The checks the padded (B, H, S, D) and packed (total, H, D) forms share once their shapes are known: head dims,
// GQA head counts, dtypes, the GPU and the build. Heads are dim 1 in both; the head dim is the last dim.
inline void check_heads_dtypes_and_build(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "q and k/v must have the same head dim (last dim), got q ",
                    shape(q.sizes()), " and k ", shape(k.sizes()));
  TORCH_CHECK_VALUE(q.size(-1) > 0, "head dim (last dim of q, k, v) must be >= 1, got shape ", shape(q.sizes()));
  TORCH_CHECK_VALUE(k.size(1) > 0, "k and v must have at least one head (dim 1), got shape ", shape(k.sizes()));
  TORCH_CHECK_VALUE(q.size(1) % k.size(1) == 0, "q heads Hq=", num(q.size(1)), " must be a multiple of k/v heads Hkv=",
                    num(k.size(1)), " (GQA: query head h uses kv head h // (Hq // Hkv))");
  check_kernel_dtype(q, "q", q);
  check_kernel_dtype(k, "k", q);
  check_kernel_dtype(v, "v", q);
  check_device_arch(q);
  check_head_dim_compiled(q.size(-1));
}

// Everything fwd / bwd need of q, k, v, in validate.py's order.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got one on ", q.device().str());
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", shape(k.sizes()), " and v ",
                    shape(v.sizes()));
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "q and k must have the same batch size, got q ", shape(q.sizes()),
                    " and k ", shape(k.sizes()));
  check_heads_dtypes_and_build(q, k, v);
  if (q.numel() == 0 || k.numel() == 0) return;  // nothing is read: no kernel launch
  const int64_t int_max = std::numeric_limits<int>::max();  // rows and (batch, head) pairs are 32-bit indices
  TORCH_CHECK_VALUE(q.size(2) < int_max && k.size(2) < int_max && q.size(0) * q.size(1) < int_max, "q ",
                    shape(q.sizes()), " / k ", shape(k.sizes()), ": seqlens and batch * heads must be < 2**31 - 1");
  check_row_layout(q, "q");
  check_row_layout(k, "k");
  check_row_layout(v, "v");
}

inline void check_scale_and_window(double scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a finite positive number, got ",
                    std::to_string(scale));
  TORCH_CHECK_VALUE(window_left >= -1, "window left must be >= -1 (-1 = unbounded), got ", num(window_left));
  TORCH_CHECK_VALUE(window_right >= -1, "window right must be >= -1 (-1 = unbounded), got ", num(window_right));
}

// The one window rule of every kernel (flashattn_ext.api.kernel_window is its Python twin): a bound that can
// exclude no key becomes -1, so the values fit int32 and the kernels skip the mask work. Query i sits at
// p = i + Sk - Sq <= Sk - 1: `left >= reach` with reach >= Sk (the most keys a row can see) never excludes a key
// (p - left < 0 <= j), and `right >= reach` with reach = Sq never does (p + right >= Sk - 1 >= j).
inline int window_bound(int64_t w, int64_t reach) { return (w < 0 || w >= reach) ? -1 : static_cast<int>(w); }

// Strides of a padded (B, H, S, D) or packed (total, H, D) operand: batch (0 when packed) and row.
inline int64_t batch_stride(const at::Tensor& t) { return t.dim() == 4 ? t.stride(0) : 0; }
inline int64_t row_stride(const at::Tensor& t) { return t.stride(t.dim() == 4 ? 2 : 0); }

// dO (and O) come from autograd with whatever strides the next op produced (expand, transpose, slicing). The
// kernels take any strides the forward accepts; anything else (strided last dim, strides not multiples of 8
// elements, misaligned view) is copied to a fresh contiguous tensor, only then.
inline at::Tensor with_kernel_layout(const at::Tensor& t) {
  const int last = static_cast<int>(t.dim()) - 1;
  bool ok = t.stride(last) == 1 || t.size(last) == 1;
  for (int d = 0; d < last; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();  // a contiguous but misaligned view needs a real copy
}

inline void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device (", q.device().str(), "), got ",
                    t.device().str());
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " shape ", shape(t.sizes()), " must equal q's shape ",
                    shape(q.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ".dtype (", dtype_name(t.scalar_type()),
                   ") must equal q.dtype (", dtype_name(q.scalar_type()), ")");
}

// A per-row statistic (lse, dlse) as the kernels index it: fp32 contiguous of `want` shape ((batch, heads_q,
// seqlen_q) padded, (heads_q, total_q) varlen: sequences.h lse_shape).
inline at::Tensor per_row_float(const at::Tensor& t, const at::Tensor& q, c10::IntArrayRef want, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device (", q.device().str(), "), got ",
                    t.device().str());
  TORCH_CHECK_VALUE(t.sizes() == want, name, " must have shape ", shape(want), " (", want.size() == 3 ?
                    "batch, heads_q, seqlen_q" : "heads_q, total_q", "), got ", shape(t.sizes()));
  return t.to(at::kFloat).contiguous();
}

// The saved forward outputs and incoming gradients as every backward kernel reads them.
struct BackwardInputs {
  at::Tensor dout, out, lse, dlse;  // dlse undefined when the loss does not use lse
};

inline BackwardInputs backward_inputs(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                      c10::IntArrayRef lse_shape) {
  BackwardInputs in{with_kernel_layout(dout), with_kernel_layout(out), per_row_float(lse, q, lse_shape, "lse"), {}};
  if (dlse.has_value() && dlse->defined()) in.dlse = per_row_float(*dlse, q, lse_shape, "dlse");
  return in;
}

// Output, lse and softmax scale fields shared by every forward-style params struct.
template <typename Params>
void fill_output_params(Params& p, const at::Tensor& out, const at::Tensor& lse, double scale) {
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = batch_stride(out);
  p.o_head_stride = out.stride(1);
  p.o_row_stride = row_stride(out);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);  // softmax runs in base 2
}

// dO, dlse and gradient pointers/strides of BwdParams (every backward family).
inline void fill_grad_params(BwdParams& p, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv) {
  p.dout = dout.data_ptr();
  p.do_batch_stride = batch_stride(dout), p.do_head_stride = dout.stride(1), p.do_row_stride = row_stride(dout);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_batch_stride = batch_stride(dq), p.dq_head_stride = dq.stride(1), p.dq_row_stride = row_stride(dq);
  p.dk_batch_stride = batch_stride(dk), p.dk_head_stride = dk.stride(1), p.dk_row_stride = row_stride(dk);
  p.dv_batch_stride = batch_stride(dv), p.dv_head_stride = dv.stride(1), p.dv_row_stride = row_stride(dv);
}

}  // namespace fae
