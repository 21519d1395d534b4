// Runtime -> compile-time dispatch over the head dims of this build, in one place; every switch ends in an error
// naming the value. The lists come from flashattn_ext/_build_config.py through setup.py (-DFAE_HEAD_DIMS=32,64,...
// and -DFAE_DECODE_HEAD_DIMS=...), so adding a head dim to the build never touches this file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/Exception.h>
#include <c10/core/ScalarType.h>
#include <string>
#include <type_traits>
#include <vector>

#ifndef FAE_HEAD_DIMS
#error "FAE_HEAD_DIMS (comma-separated head dims of this build) is set by setup.py from flashattn_ext/_build_config.py"
#endif

#define FAE_DTYPE_SWITCH(DTYPE, T, ...)                                                          \
  [&] {                                                                                          \
    if ((DTYPE) == c10::ScalarType::Half) {                                                      \
      using T = __half;                                                                          \
      return __VA_ARGS__();                                                                      \
    } else if ((DTYPE) == c10::ScalarType::BFloat16) {                                           \
      using T = __nv_bfloat16;                                                                   \
      return __VA_ARGS__();                                                                      \
    }                                                                                            \
    TORCH_CHECK(false, "flashattn_ext: unsupported dtype ", (DTYPE), " (expected float16 or bfloat16)"); \
  }()

namespace fae {

template <int... Ds>
struct HeadDims {};
using CompiledHeadDims = HeadDims<FAE_HEAD_DIMS>;  // attention fwd / bwd, every family
#ifdef FAE_DECODE_HEAD_DIMS
using DecodeHeadDims = HeadDims<FAE_DECODE_HEAD_DIMS>;  // attention_with_kvcache; kvcache ops exist only then
#define FAE_HAS_DECODE 1
#endif

template <int... Ds>
std::vector<int> head_dim_list(HeadDims<Ds...>) {
  return {Ds...};
}

// Calls f(std::integral_constant<int, d>) for d in the list, else raises naming `what`.
template <int D, int... Rest, typename F>
void head_dim_switch(HeadDims<D, Rest...>, int d, const char* what, F&& f) {
  if (d == D) return f(std::integral_constant<int, D>{});
  if constexpr (sizeof...(Rest) > 0) {
    return head_dim_switch(HeadDims<Rest...>{}, d, what, f);
  } else {
    TORCH_CHECK_VALUE(false, "head dim ", std::to_string(d), " is not compiled into this build (", what, ")");
  }
}

// Head dims compiled into this build, for build_info() and the argument checks.
inline std::vector<int> compiled_head_dims() { return head_dim_list(CompiledHeadDims{}); }

}  // namespace fae

// FAE_HEADDIM_SWITCH(d, kHeadDim, [&] { ... kHeadDim ... }) over the compiled head dims.
#define FAE_HEADDIM_SWITCH(D, HDIM, ...)                                           \
  fae::head_dim_switch(fae::CompiledHeadDims{}, (D), "attention", [&](auto hdim_) { \
    constexpr int HDIM = decltype(hdim_)::value;                                   \
    return __VA_ARGS__();                                                          \
  })
