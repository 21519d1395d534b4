// The kernel family choice, in one place: which family runs an `algorithm` on a GPU of a given compute
// capability, and the launch of that family with its own scratch buffers. A new family (e.g. Hopper FA3) is one
// more enum value and one more case here; the ops, their schemas and the Python side stay as they are.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <cuda_runtime_api.h>
#include "../common/params.h"

namespace fae {

enum class Family { kFa2, kFa1, kFa3 };
enum class Direction { kFwd, kBwd };

// The names `algorithm` accepts, as Python prints the tuple in its error message.
constexpr const char* kAlgorithmNames = "('auto', 'fa2', 'fa1', 'fa3')";

// The family that runs `algorithm` ("auto", "fa2", "fa1", "fa3") in `direction` on a GPU of compute capability
// `arch` (major * 10 + minor) for head dim `head_dim`. ValueError naming `algorithm` for an unknown name or one
// this GPU / head dim / build cannot run. `varlen` (packed sequences, attention_varlen): the same choice (fa3 on
// sm_90 for "auto"), except that "fa1" raises (FA1 has no varlen kernels).
Family choose_family(c10::string_view algorithm, int arch, Direction direction, int head_dim, bool varlen = false);

// True when this build has the Hopper forward for head_dim: sm_90a code compiled in and the head dim among the
// family's (multiples of 64 that the build instantiates).
bool fa3_fwd_available(int head_dim);
// Same for the Hopper backward (head dims 64 and 128; D256's dK and dV accumulators alone would need 256 registers).
bool fa3_bwd_available(int head_dim);
const char* family_name(Family family);

// Launches the family's forward on filled params (q/k/v, output, window); allocates the family's scratch.
void run_fwd(Family family, const FwdParams& params, const at::Tensor& q, cudaStream_t stream);

// Launches the family's backward on filled params (FwdParams part + gradient part); allocates the family's
// scratch. dk / dv are the op's outputs (FA1 with GQA writes them from fp32 accumulators after the kernel).
void run_bwd(Family family, BwdParams& params, const at::Tensor& q, at::Tensor& dk, at::Tensor& dv,
             cudaStream_t stream);

}  // namespace fae
