// Op schemas (TORCH_LIBRARY) and their CUDA implementations, plus build information for Python.
#include <torch/extension.h>
#include <torch/library.h>
#include <cuda_runtime_api.h>
#include "include/switch.h"

namespace fae {
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       double scale, int64_t window_left, int64_t window_right, bool deterministic);
}

#ifndef FAE_CUDA_ARCHS
#define FAE_CUDA_ARCHS "unknown"
#endif

TORCH_LIBRARY(flashattn_ext, m) {
  // deterministic is unused by the forward; autograd saves it for the backward (flashattn_ext/_ops.py), so one
  // op carries the choice through torch.compile graphs.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, bool deterministic=False) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) { m.impl("fwd", &fae::fwd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["cuda_archs"] = FAE_CUDA_ARCHS;
    info["head_dims"] = fae::compiled_head_dims();
    info["dtypes"] = std::vector<std::string>{"float16", "bfloat16"};
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
    return info;
  });
}
