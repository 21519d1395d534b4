// Family choice and per-family launch (see dispatch.h). Each family's scratch buffers are allocated here, next
// to its launch, so fwd.cpp / bwd.cpp stay family-neutral.
#include "dispatch.h"
#include <algorithm>
#include <string>
#include <vector>
#include "switch.h"
#include "checks.h"

namespace fae {

// Launchers, instantiated per (dtype, head dim) in csrc/instantiations/.
template <typename T, int kHeadDim>
void run_fa2_fwd(const FwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_fa1_fwd(const Fa1FwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_fa2_bwd(const BwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_fa1_bwd(const Fa1BwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_fa3_fwd(const FwdParams& params, cudaStream_t stream);

const char* family_name(Family family) {
  switch (family) {
    case Family::kFa2: return "fa2";
    case Family::kFa1: return "fa1";
    case Family::kFa3: return "fa3";
  }
  return "?";
}

bool fa3_fwd_available(int head_dim) {
  // The kernels are compiled for every arch in the build, but only the sm_90a image holds the Hopper code (the
  // others are empty stubs), so the family exists only in builds that list 90a.
  static const bool has_sm90a = std::string(FAE_CUDA_ARCHS).find("90a") != std::string::npos;
  static const std::vector<int> fa3 = head_dim_list(Fa3HeadDims{}), built = compiled_head_dims();
  const auto has = [head_dim](const std::vector<int>& dims) {
    return std::find(dims.begin(), dims.end(), head_dim) != dims.end();
  };
  return has_sm90a && has(fa3) && has(built);
}

Family choose_family(c10::string_view algorithm, int arch, Direction direction, int head_dim) {
  // "auto": the Hopper family (fa3) for the forward on sm_90 when this build has it for the head dim (measured
  // 1.3-1.6x FA2 on the H200, bench/NOTES.md); FA2 otherwise, and for every backward until a Hopper backward
  // exists (the FA2 backward takes any forward's out and lse). FA2 was measured faster than FA1 everywhere.
  if (algorithm == "auto") {
    if (direction == Direction::kFwd && arch == 90 && fa3_fwd_available(head_dim)) return Family::kFa3;
    return Family::kFa2;
  }
  if (algorithm == "fa2") return Family::kFa2;
  if (algorithm == "fa1") return Family::kFa1;
  if (algorithm == "fa3") {
    if (direction == Direction::kBwd) return Family::kFa2;
    TORCH_CHECK_VALUE(arch == 90, "algorithm='fa3' needs a Hopper GPU (compute capability 9.0, sm_90a), got ",
                      std::to_string(arch / 10), ".", std::to_string(arch % 10));
    if (!fa3_fwd_available(head_dim)) {
      std::string dims;
      for (int d : head_dim_list(Fa3HeadDims{})) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
      TORCH_CHECK_VALUE(false, "algorithm='fa3' is not available for head dim ", std::to_string(head_dim),
                        " in this build (the Hopper family takes head dims ", dims,
                        " and needs a build with arch 90a)");
    }
    return Family::kFa3;
  }
  TORCH_CHECK_VALUE(false, "algorithm must be one of ", kAlgorithmNames, ", got '", std::string(algorithm), "'");
}

namespace {

template <typename T, int kHeadDim>
void launch_fa1_fwd(const FwdParams& params, const at::Tensor& q, cudaStream_t stream) {
  // FA1's global-memory state between K/V tiles. Never read before the kernel writes it, so no memset.
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t B = params.batch, H = params.heads_q, S = params.seqlen_q;
  at::Tensor o_acc = at::empty({B, H, S, params.head_dim}, f32);
  at::Tensor m = at::empty({B, H, S}, f32);
  at::Tensor l = at::empty({B, H, S}, f32);
  Fa1FwdParams p{};
  static_cast<FwdParams&>(p) = params;
  p.o_acc = o_acc.data_ptr<float>();
  p.m = m.data_ptr<float>();
  p.l = l.data_ptr<float>();
  run_fa1_fwd<T, kHeadDim>(p, stream);
}

template <typename T, int kHeadDim>
void launch_fa2_bwd(BwdParams& p, const at::Tensor& q, cudaStream_t stream) {
  const int64_t B = p.batch, H = p.heads_q, Sq = p.seqlen_q;
  const int64_t Sq_r = (Sq + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({B, H, Sq_r}, f32), lse_log2 = at::empty({B, H, Sq_r}, f32);
  at::Tensor dq_accum;  // zeroed by the preprocess kernel
  if (!p.deterministic) dq_accum = at::empty({B, H, Sq_r, p.head_dim}, f32);
  p.dsoftmax_sum = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  p.dq_accum = p.deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.seqlen_q_rounded = static_cast<int>(Sq_r);
  run_fa2_bwd<T, kHeadDim>(p, stream);
}

template <typename T, int kHeadDim>
void launch_fa1_bwd(const BwdParams& params, const at::Tensor& q, at::Tensor& dk, at::Tensor& dv,
                    cudaStream_t stream) {
  const int64_t B = params.batch, Hq = params.heads_q, Hkv = params.heads_kv, D = params.head_dim;
  const auto f32 = q.options().dtype(at::kFloat);
  // FA1's dQ round trip between K/V tiles; never read before the kernel writes it, so no memset.
  at::Tensor dq_accum = at::empty({B, Hq, params.seqlen_q, D}, f32);
  // GQA: the group's query heads (separate blocks) add their dK/dV into zeroed fp32 buffers.
  const bool gqa = Hq != Hkv;
  at::Tensor dk_accum, dv_accum;
  if (gqa) {
    dk_accum = at::zeros({B, Hkv, params.seqlen_k, D}, f32);
    dv_accum = at::zeros({B, Hkv, params.seqlen_k, D}, f32);
  }
  Fa1BwdParams p{};
  static_cast<BwdParams&>(p) = params;
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk_accum = gqa ? dk_accum.data_ptr<float>() : nullptr;
  p.dv_accum = gqa ? dv_accum.data_ptr<float>() : nullptr;
  run_fa1_bwd<T, kHeadDim>(p, stream);
  if (gqa) {  // already scaled by the kernel; copy_ converts to the dtype and k's / v's layout
    dk.copy_(dk_accum);
    dv.copy_(dv_accum);
  }
}

}  // namespace

void run_fwd(Family family, const FwdParams& params, const at::Tensor& q, cudaStream_t stream) {
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      switch (family) {
        case Family::kFa2:
          run_fa2_fwd<T, kHeadDim>(params, stream);
          return;
        case Family::kFa1:
          launch_fa1_fwd<T, kHeadDim>(params, q, stream);
          return;
        case Family::kFa3:
          if constexpr (in_head_dims<kHeadDim>(Fa3HeadDims{})) {  // instantiated for these (generate.py)
            run_fa3_fwd<T, kHeadDim>(params, stream);
            return;
          }
          TORCH_CHECK_VALUE(false, "algorithm='fa3' does not take head dim ", std::to_string(kHeadDim));
      }
    });
  });
}

void run_bwd(Family family, BwdParams& params, const at::Tensor& q, at::Tensor& dk, at::Tensor& dv,
             cudaStream_t stream) {
  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    FAE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      switch (family) {
        case Family::kFa2:
          launch_fa2_bwd<T, kHeadDim>(params, q, stream);
          return;
        case Family::kFa1:
          launch_fa1_bwd<T, kHeadDim>(params, q, dk, dv, stream);
          return;
        case Family::kFa3:  // choose_family maps fa3's backward to kFa2 until a Hopper backward exists
          TORCH_CHECK_VALUE(false, "algorithm='fa3' has no backward in this build");
      }
    });
  });
}

}  // namespace fae
