// The one online-softmax primitive. Every kernel (FA2, FA1, split-KV combine, merge_states) keeps, per query
// row, a running max m and a running sum l of exp2(score - m), in the log2 domain (scores pre-multiplied by
// scale * log2(e)), and folds new keys in through rescale_to() or whole partial results through merge().
#pragma once
#include <cmath>

namespace fae {

struct SoftmaxState {
  float m;  // running max of log2-domain scores; -inf while the row has seen no visible key
  float l;  // running sum of exp2(score - m)

  __host__ __device__ __forceinline__ void init() {
    m = -INFINITY;
    l = 0.f;
  }

  // Offset to subtract from a log2-domain score before exp2. A row that has seen nothing uses 0, so
  // exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
  __host__ __device__ __forceinline__ float exp_offset() const { return m == -INFINITY ? 0.f : m; }

  // Raise the running max to include new_max; returns the factor everything accumulated so far (l and the
  // output accumulator) must be multiplied by.
  __device__ __forceinline__ float rescale_to(float new_max) {
    const float m_new = fmaxf(m, new_max);
    const float factor = (m_new == -INFINITY) ? 1.f : exp2f(m - m_new);
    m = m_new;
    l *= factor;
    return factor;
  }

  // Combine with the state of a disjoint set of keys. On return this state covers both; fa / fb are the
  // factors for this state's and other's (unnormalised) output accumulators.
  __host__ __device__ __forceinline__ void merge(const SoftmaxState& other, float& fa, float& fb) {
    const float m_new = fmaxf(m, other.m);
    fa = (m == -INFINITY) ? 0.f : exp2f(m - m_new);
    fb = (other.m == -INFINITY) ? 0.f : exp2f(other.m - m_new);
    m = m_new;
    l = l * fa + other.l * fb;
  }

  // 1/l for the final normalisation; 0 for a row that saw nothing (its output is 0, never NaN).
  __host__ __device__ __forceinline__ float inv_sum() const { return l > 0.f ? 1.f / l : 0.f; }

  // Natural-log logsumexp of the raw scaled scores; -inf for a row that saw nothing.
  __host__ __device__ __forceinline__ float lse() const {
    return l > 0.f ? (m + log2f(l)) * 0.69314718055994530942f : -INFINITY;
  }

  // State equivalent to a normalised output with the given natural-log lse (l = 1 at m = lse in log2 domain).
  __host__ __device__ __forceinline__ static SoftmaxState from_lse(float lse_nat) {
    SoftmaxState s;
    s.m = lse_nat == -INFINITY ? -INFINITY : lse_nat * 1.44269504088896340736f;
    s.l = lse_nat == -INFINITY ? 0.f : 1.f;
    return s;
  }
};

}  // namespace fae
