// Family choice and per-family launch (see dispatch.h). Each family's scratch buffers are allocated here, next
// to its launch, so fwd.cpp / bwd.cpp stay family-neutral.
#include "dispatch.h"
#include <algorithm>
#include <initializer_list>
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
template <typename T, int kHeadDim>
void run_fa3_bwd(const BwdParams& params, cudaStream_t stream);

const char* family_name(Family family) {
  switch (family) {
    case Family::kFa2: return "fa2";
    case Family::kFa1: return "fa1";
    case Family::kFa3: return "fa3";
  }
  return "?";
}

namespace {

// The kernels are compiled for every arch in the build, but only the sm_90a image holds the Hopper code (the
// others are empty stubs), so the family exists only in builds that list 90a, and for its head dims
// (flashattn_ext/_build_config.py FA3_HEAD_DIMS, FA3_BWD_HEAD_DIMS).
bool fa3_has(int head_dim, std::initializer_list<int> family_dims) {
  static const bool has_sm90a = std::string(FAE_CUDA_ARCHS).find("90a") != std::string::npos;
  if (!has_sm90a || std::find(family_dims.begin(), family_dims.end(), head_dim) == family_dims.end()) return false;
  const std::vector<int> built = compiled_head_dims();
  return std::find(built.begin(), built.end(), head_dim) != built.end();
}

}  // namespace

#if !defined(FAE_FA3_HEAD_DIMS) || !defined(FAE_FA3_BWD_HEAD_DIMS)
#error "FAE_FA3_HEAD_DIMS / FAE_FA3_BWD_HEAD_DIMS are set by setup.py from flashattn_ext/_build_config.py"
#endif
bool fa3_fwd_available(int head_dim) { return fa3_has(head_dim, {FAE_FA3_HEAD_DIMS}); }
bool fa3_bwd_available(int head_dim) { return fa3_has(head_dim, {FAE_FA3_BWD_HEAD_DIMS}); }

Family choose_family(c10::string_view algorithm, int arch, Direction direction, int head_dim, bool varlen) {
  // Packed sequences (varlen) follow the same rule below: the FA2 and Hopper kernels both read them through
  // SeqInfo; FA1 keeps its padded-only kernels.
  TORCH_CHECK_VALUE(!(varlen && algorithm == "fa1"), "algorithm='fa1' does not support varlen (attention_varlen); "
                    "use algorithm='auto', 'fa2' or 'fa3'");
  // "auto": the Hopper family (fa3) on sm_90 where this build has it for the head dim and direction (measured
  // forward 1.1-1.9x, backward 1.2-1.3x SDPA flash on the H200, bench/NOTES.md); FA2 otherwise (the FA2 backward
  // takes any forward's out and lse, so a D256 fa3 forward pairs with the FA2 backward). FA2 was measured faster
  // than FA1 everywhere.
  const bool fwd = direction == Direction::kFwd;
  const bool fa3_here = arch == 90 && (fwd ? fa3_fwd_available(head_dim) : fa3_bwd_available(head_dim));
  if (algorithm == "auto") return fa3_here ? Family::kFa3 : Family::kFa2;
  if (algorithm == "fa2") return Family::kFa2;
  if (algorithm == "fa1") return Family::kFa1;
  if (algorithm == "fa3") {
    if (!fwd) return fa3_here ? Family::kFa3 : Family::kFa2;
    TORCH_CHECK_VALUE(arch == 90, "algorithm='fa3' needs a Hopper GPU (compute capability 9.0, sm_90a), got ",
                      std::to_string(arch / 10), ".", std::to_string(arch % 10));
    TORCH_CHECK_VALUE(fa3_fwd_available(head_dim), "algorithm='fa3' is not available for head dim ",
                      std::to_string(head_dim), " in this build (the Hopper family takes head dims ",
                      "64, 128, 256", " and needs a build with arch 90a)");
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

// FA2 and FA3 backward scratch: Delta and lse_log2 rows padded to kBwdSeqRound, and the fp32 dq_accum (zeroed by
// the preprocess kernel) unless deterministic. The tensors must stay alive until the launches are enqueued.
// Varlen: (H, round_up(total_q + B * kBwdSeqRound)) rows, room for every sequence's own rounded-up rows
// (seqlen.h bwd_row0, bwd_rows_per_head); seqlen_q_rounded is then the longest sequence's rounded length (the
// preprocess grid).
std::vector<at::Tensor> padded_bwd_buffers(BwdParams& p, const at::Tensor& q) {
  const int64_t B = p.batch, H = p.heads_q, Sq = p.seqlen_q;
  const int64_t Sq_r = (Sq + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
  const auto f32 = q.options().dtype(at::kFloat);
  std::vector<int64_t> rows{B, H, Sq_r};
  if (p.cu_seqlens_q != nullptr)  // seqlen.h bwd_rows_per_head: rounded up so each head's rows start aligned
    rows = {H, (p.total_q + B * kBwdSeqRound + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound};
  at::Tensor delta = at::empty(rows, f32), lse_log2 = at::empty(rows, f32);
  at::Tensor dq_accum;
  rows.push_back(p.head_dim);
  if (!p.deterministic) dq_accum = at::empty(rows, f32);
  p.dsoftmax_sum = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  p.dq_accum = p.deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.seqlen_q_rounded = static_cast<int>(Sq_r);
  return {delta, lse_log2, dq_accum};
}

template <typename T, int kHeadDim>
void launch_fa2_bwd(BwdParams& p, const at::Tensor& q, cudaStream_t stream) {
  const auto buffers = padded_bwd_buffers(p, q);
  run_fa2_bwd<T, kHeadDim>(p, stream);
}

template <typename T, int kHeadDim>
void launch_fa3_bwd(BwdParams& p, const at::Tensor& q, cudaStream_t stream) {
  if constexpr (kHeadDim == 64 || kHeadDim == 128) {  // choose_family only picks fa3 for these
    // The Hopper backward's grid puts heads and batches in grid y / z (limit 65,535 each); FA2's flat grid
    // takes any size.
    if (p.batch > 65535 || p.heads_q > 65535) return launch_fa2_bwd<T, kHeadDim>(p, q, stream);
    const auto buffers = padded_bwd_buffers(p, q);
    run_fa3_bwd<T, kHeadDim>(p, stream);
  } else {
    TORCH_CHECK_VALUE(false, "the fa3 backward does not take head dim ", std::to_string(kHeadDim));
  }
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
          if constexpr (kHeadDim % 64 == 0) {  // choose_family only picks fa3 for its head dims
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
        case Family::kFa3:
          launch_fa3_bwd<T, kHeadDim>(params, q, stream);
          return;
      }
    });
  });
}

}  // namespace fae
