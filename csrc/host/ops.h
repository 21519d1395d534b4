// The CUDA implementations of the ops whose schemas ops.cpp defines (one declaration per op).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <optional>
#include <tuple>

namespace fae {

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       int64_t window_left, int64_t window_right, bool deterministic,
                                       c10::string_view algorithm,
                                       const std::optional<at::Tensor>& cu_seqlens_q = std::nullopt,
                                       const std::optional<at::Tensor>& cu_seqlens_k = std::nullopt,
                                       int64_t max_seqlen_q = 0, int64_t max_seqlen_k = 0);

// fwd with the gathered Longformer global keys counted in the kernel (Hopper family; fwd.cpp).
std::tuple<at::Tensor, at::Tensor> fwd_global(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& global_k, const at::Tensor& global_v,
                                              const at::Tensor& global_pos, double scale, int64_t window_left,
                                              int64_t window_right, bool global_causal, c10::string_view algorithm);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   double scale, int64_t window_left, int64_t window_right,
                                                   bool deterministic, const std::optional<at::Tensor>& dlse,
                                                   c10::string_view algorithm,
                                                   const std::optional<at::Tensor>& cu_seqlens_q = std::nullopt,
                                                   const std::optional<at::Tensor>& cu_seqlens_k = std::nullopt,
                                                   int64_t max_seqlen_q = 0, int64_t max_seqlen_k = 0);

std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                               const std::optional<at::Tensor>& block_table,
                                               const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new, double scale,
                                               int64_t window_left, int64_t window_right, int64_t num_splits,
                                               const std::optional<at::Tensor>& workspace,
                                               const std::optional<at::Tensor>& q_pos);

std::tuple<at::Tensor, at::Tensor> merge_states(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                                                const at::Tensor& lse_b);

}  // namespace fae
