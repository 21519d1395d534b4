// Runtime -> compile-time dispatch, in one place. Every switch ends in an error branch naming the value.
// Head dims can be left out of a build (FLASHATTN_EXT_HEAD_DIMS in setup.py defines FAE_NO_HDIM<D>).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/Exception.h>
#include <c10/core/ScalarType.h>
#include <string>
#include <vector>

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

#define FAE_HDIM_CASE(D, HDIM, ...) \
  case D: {                         \
    constexpr int HDIM = D;         \
    return __VA_ARGS__();           \
  }

#ifdef FAE_NO_HDIM32
#define FAE_CASE_32(HDIM, ...)
#else
#define FAE_CASE_32(HDIM, ...) FAE_HDIM_CASE(32, HDIM, __VA_ARGS__)
#endif
#ifdef FAE_NO_HDIM64
#define FAE_CASE_64(HDIM, ...)
#else
#define FAE_CASE_64(HDIM, ...) FAE_HDIM_CASE(64, HDIM, __VA_ARGS__)
#endif
#ifdef FAE_NO_HDIM96
#define FAE_CASE_96(HDIM, ...)
#else
#define FAE_CASE_96(HDIM, ...) FAE_HDIM_CASE(96, HDIM, __VA_ARGS__)
#endif
#ifdef FAE_NO_HDIM128
#define FAE_CASE_128(HDIM, ...)
#else
#define FAE_CASE_128(HDIM, ...) FAE_HDIM_CASE(128, HDIM, __VA_ARGS__)
#endif
#ifdef FAE_NO_HDIM256
#define FAE_CASE_256(HDIM, ...)
#else
#define FAE_CASE_256(HDIM, ...) FAE_HDIM_CASE(256, HDIM, __VA_ARGS__)
#endif

#define FAE_HEADDIM_SWITCH(D, HDIM, ...)                                                        \
  [&] {                                                                                         \
    switch (D) {                                                                                \
      FAE_CASE_32(HDIM, __VA_ARGS__)                                                            \
      FAE_CASE_64(HDIM, __VA_ARGS__)                                                            \
      FAE_CASE_96(HDIM, __VA_ARGS__)                                                            \
      FAE_CASE_128(HDIM, __VA_ARGS__)                                                           \
      FAE_CASE_256(HDIM, __VA_ARGS__)                                                           \
      default:                                                                                  \
        TORCH_CHECK(false, "flashattn_ext: head dim ", std::to_string(D), " is not compiled into this build"); \
    }                                                                                           \
  }()

// The decode kernels (csrc/decode) are instantiated for head dims 64 and 128 only; without both, the kvcache_fwd
// and merge_states ops are not defined.
#if !(defined(FAE_NO_HDIM64) && defined(FAE_NO_HDIM128))
#define FAE_HAS_DECODE 1
#endif

namespace fae {
// Head dims compiled into this build, for build_info() and validation.
inline std::vector<int> compiled_head_dims() {
  std::vector<int> dims;
#ifndef FAE_NO_HDIM32
  dims.push_back(32);
#endif
#ifndef FAE_NO_HDIM64
  dims.push_back(64);
#endif
#ifndef FAE_NO_HDIM96
  dims.push_back(96);
#endif
#ifndef FAE_NO_HDIM128
  dims.push_back(128);
#endif
#ifndef FAE_NO_HDIM256
  dims.push_back(256);
#endif
  return dims;
}
}  // namespace fae
