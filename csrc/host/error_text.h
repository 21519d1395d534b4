// Numbers and shapes in error messages, formatted with std::to_string. Streaming an integer into a
// TORCH_CHECK message (ostream << long, also inside IntArrayRef's operator<<) crashed this library with a
// segfault on the GPU image's toolchain (H100 machine, g++ 13 + torch 2.11, 2026-11-24): a clear error must
// never become a crash, so no message streams an integer.
#pragma once
#include <c10/util/ArrayRef.h>
#include <string>

namespace fae {

template <typename I>
inline std::string num(I value) {
  return std::to_string(value);
}

inline std::string shape(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + ")";
}

}  // namespace fae
