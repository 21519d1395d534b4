// Every op of the library: schemas (TORCH_LIBRARY), their CUDA implementations, the autograd of fwd, and the
// build information Python reads. One op per direction (fwd, bwd); `algorithm` picks the kernel family in C++
// (dispatch.cpp), so a new family is a case there, not a new op.
#include <torch/extension.h>
#include <torch/library.h>
#include <cuda_runtime_api.h>
#include <algorithm>
#include <string>
#include "switch.h"
#include "checks.h"
#include "dispatch.h"
#include "ops.h"

#ifndef FAE_CUDA_ARCHS
#define FAE_CUDA_ARCHS "unknown"
#endif

namespace fae {

void check_head_dim_compiled(int64_t head_dim) {
  static const std::vector<int> dims = compiled_head_dims();
  if (std::find(dims.begin(), dims.end(), head_dim) != dims.end()) return;
  std::string list = "[";
  for (size_t i = 0; i < dims.size(); ++i) list += (i ? ", " : "") + std::to_string(dims[i]);
  TORCH_CHECK_VALUE(false, "head dim ", num(head_dim), " (last dim of q, k, v) is not supported by the CUDA "
                    "kernels; supported: ", list, "]");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd of fwd, in C++ so a call that needs no gradient pays no Python (a Python autograd kernel costs about
// 18 us per call). forward runs the op below autograd (CUDA kernel, or the fake impl under meta / FakeTensor
// tracing); backward calls the bwd op with the same algorithm, so torch.compile sees two custom ops.
class FwdFunction : public torch::autograd::Function<FwdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, int64_t window_left, int64_t window_right, bool deterministic,
                               c10::string_view algorithm, const std::optional<at::Tensor>& cu_seqlens_q,
                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                               int64_t max_seqlen_k) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flashattn_ext::fwd", "")
                         .typed<decltype(fwd)>();
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = op.call(q, k, v, scale, window_left, window_right, deterministic, algorithm, cu_seqlens_q,
                                   cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    }
    ctx->set_materialize_grads(false);  // an unused lse gets no zero-filled gradient
    // cu_seqlens are saved as (possibly undefined) tensors: the padded form saves two undefined ones.
    ctx->save_for_backward({q, k, v, out, lse, cu_seqlens_q.value_or(at::Tensor()),
                            cu_seqlens_k.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["algorithm"] = std::string(algorithm);
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flashattn_ext::bwd", "")
                         .typed<decltype(bwd)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
    if (saved[5].defined()) cu_seqlens_q = saved[5];
    if (saved[6].defined()) cu_seqlens_k = saved[6];
    // grad_lse folds into Delta in the kernel (d lse / d scores = P), so a loss may use lse too.
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    std::optional<at::Tensor> dlse;
    if (grads[1].defined()) dlse = grads[1];
    const std::string algorithm = ctx->saved_data["algorithm"].toStringRef();
    auto [dq, dk, dv] = op.call(dout, q, k, v, out, lse, ctx->saved_data["scale"].toDouble(),
                                ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                                ctx->saved_data["deterministic"].toBool(), dlse, algorithm, cu_seqlens_q,
                                cu_seqlens_k, ctx->saved_data["max_seqlen_q"].toInt(),
                                ctx->saved_data["max_seqlen_k"].toInt());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, int64_t window_left, int64_t window_right,
                                                bool deterministic, c10::string_view algorithm,
                                                const std::optional<at::Tensor>& cu_seqlens_q,
                                                const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                int64_t max_seqlen_k) {
  auto r = FwdFunction::apply(q, k, v, scale, window_left, window_right, deterministic, algorithm, cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace fae

TORCH_LIBRARY(flashattn_ext, m) {
  // algorithm: "auto" | "fa2" | "fa1" | "fa3", resolved with the device's compute capability in dispatch.cpp.
  // deterministic is unused by the forward; autograd saves it for the backward, so one op carries the choice
  // through torch.compile graphs. window_left/right: -1 = unbounded, causal already folded in (right = 0).
  // Varlen (attention_varlen): cu_seqlens_q/k (B + 1,) int32 on q's device, q (total_q, Hq, D), k/v (total_k, Hkv,
  // D), lse (Hq, total_q); max_seqlen_q/k size the grids. The same ops as the padded form, so one autograd, one
  // fake impl and one dispatch serve both (docs/architecture.md "Varlen").
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, bool deterministic=False, "
      "str algorithm=\"auto\", Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
      "int max_seqlen_k=0) -> (Tensor, Tensor)");
  // Global keys (flashattn_ext/global_tokens.py): global_k/v (B, Hkv, G, D) contiguous, gathered from k/v;
  // global_pos (B, G) int32 their positions, -1 for padding. No autograd: global_tokens owns it.
  m.def(
      "fwd_global(Tensor q, Tensor k, Tensor v, Tensor global_k, Tensor global_v, Tensor global_pos, float scale, "
      "int window_left, int window_right, bool global_causal, str algorithm=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, int window_left, "
      "int window_right, bool deterministic, Tensor? dlse=None, str algorithm=\"auto\", Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor, Tensor, Tensor)");
#ifdef FAE_HAS_DECODE
  // k_cache / v_cache are written (k_new appended at cache_seqlens) and workspace is scratch: all marked mutable.
  m.def(
      "kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? block_table, "
      "Tensor? k_new, Tensor? v_new, float scale, int window_left, int window_right, int num_splits, "
      "Tensor(c!)? workspace, Tensor? q_pos=None) -> (Tensor, Tensor)");
  m.def("merge_states(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor, Tensor)");
#endif
}

TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) {
  m.impl("fwd", &fae::fwd);
  m.impl("fwd_global", &fae::fwd_global);
  m.impl("bwd", &fae::bwd);
#ifdef FAE_HAS_DECODE
  m.impl("kvcache_fwd", &fae::kvcache_fwd);
  m.impl("merge_states", &fae::merge_states);
#endif
}

// Autograd alias key: CUDA, meta and FakeTensor calls all build the graph here.
TORCH_LIBRARY_IMPL(flashattn_ext, Autograd, m) { m.impl("fwd", &fae::fwd_autograd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["cuda_archs"] = FAE_CUDA_ARCHS;
    info["head_dims"] = fae::compiled_head_dims();
    info["dtypes"] = std::vector<std::string>{"float16", "bfloat16"};
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
    return info;
  });
  m.def(
      "resolve_algorithm",
      [](const std::string& algorithm, int device, int head_dim) {
        return std::string(fae::family_name(
            fae::choose_family(algorithm, fae::device_arch(device), fae::Direction::kFwd, head_dim)));
      },
      pybind11::arg("algorithm"), pybind11::arg("device"), pybind11::arg("head_dim") = 128,
      "The kernel family attention(..., algorithm=algorithm) runs on CUDA device `device` for head dim `head_dim`"
      " (forward).");
}
