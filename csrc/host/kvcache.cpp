// flashattn_ext::kvcache_fwd (attention against a paged or contiguous KV cache, with optional append of new
// tokens) and flashattn_ext::merge_states (schemas in ops.cpp). No check here reads device memory, so the ops can
// be captured in a CUDA graph and never synchronise: the values of cache_seqlens and block_table are clamped by
// the kernels (csrc/decode), and flashattn_ext/kvcache.py checks them on the host only when asked
// (check_values=True) or for CPU tensors.
//
// Only head dims 64 and 128 are instantiated for decode (csrc/instantiations/decode_*); with neither in the
// build, the ops are not defined and Python falls back / raises.
#include "switch.h"
#ifdef FAE_HAS_DECODE
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>
#include "../common/params.h"
#include "checks.h"
#include "ops.h"

namespace fae {

template <typename T, int kHeadDim>
void run_kvcache_fwd(const KvCacheParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
DecodePlan decode_plan(const KvCacheParams& params, int sms, int64_t max_splits);
template <typename T>
void run_merge_states(const MergeStatesParams& params, cudaStream_t stream);

namespace {

constexpr int kDecodeBlockM = 16;     // DecodeTraits::kBlockM: packed (query row, group head) rows per block
constexpr int64_t kMaxSplits = 256;   // explicit num_splits limit
constexpr int64_t kAutoMaxSplits = 64;

template <typename F>
void decode_hdim_switch(int64_t D, F&& f) {
  static const std::vector<int> dims = head_dim_list(DecodeHeadDims{});
  if (std::find(dims.begin(), dims.end(), D) == dims.end()) {
    std::string list;
    for (size_t i = 0; i < dims.size(); ++i) list += (i ? ", " : "") + std::to_string(dims[i]);
    TORCH_CHECK_VALUE(false, "head dim ", num(D), " is not supported by the CUDA decode kernels; supported: [", list,
                      "]");
  }
  head_dim_switch(DecodeHeadDims{}, static_cast<int>(D), "decode", f);
}

// Split count for num_splits = 0, from shapes only (the real lengths live on the device). All blocks of a call
// do the same work, so they run in whole waves of `wave` resident blocks (SMs x blocks per SM): a last wave that
// is mostly empty leaves most SMs with fewer bytes in flight for as long as a full one. So: the smallest split
// count whose wave efficiency (blocks / whole waves of blocks) reaches kWaveTarget, else the most efficient one;
// at most kAutoMaxSplits, and one split per 256 keys of capacity. One sequence, 8 kv heads, 264 resident blocks:
// 32 splits (256 blocks); a batch that already fills whole waves (64 x 8 on 2 blocks/SM: 1.94 waves): 1.
constexpr double kWaveTarget = 0.95;
int64_t max_auto_splits(int64_t capacity) {
  return std::max<int64_t>(1, std::min(kAutoMaxSplits, (capacity + 255) / 256));
}

int64_t auto_num_splits(int64_t base_blocks, int64_t capacity, int64_t wave) {
  if (base_blocks <= 0 || capacity <= 256 || wave <= 0) return 1;
  const int64_t max_splits = max_auto_splits(capacity);
  int64_t best_s = 1;
  double best = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>(base_blocks * s) / static_cast<double>(wave);
    const double eff = waves / std::ceil(waves);
    if (eff >= kWaveTarget) return s;
    if (eff > best + 1e-9) best = eff, best_s = s;
  }
  return best_s;
}

// A CUDA operand of the decode kernels: q's dtype and device, 4-D, rows loadable with 16-byte cp.async.
void check_cache_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device().str(), " but q is on ", q.device().str(),
                    "; all tensors must be on one device");
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D, got shape ", shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ".dtype (", dtype_name(t.scalar_type()),
                   ") must equal q.dtype (", dtype_name(q.scalar_type()), ")");
  check_row_layout(t, name);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                               const std::optional<at::Tensor>& block_table,
                                               const std::optional<at::Tensor>& k_new,
                                               const std::optional<at::Tensor>& v_new, double scale,
                                               int64_t window_left, int64_t window_right, int64_t num_splits,
                                               const std::optional<at::Tensor>& workspace,
                                               const std::optional<at::Tensor>& q_pos) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got one on ", q.device().str());
  check_cache_operand(q, "q", q);
  check_kernel_dtype(q, "q", q);
  check_device_arch(q);
  check_cache_operand(k_cache, "k_cache", q);
  check_cache_operand(v_cache, "v_cache", q);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be 4-D and of one shape, got ",
                    shape(k_cache.sizes()), " and ", shape(v_cache.sizes()));
  check_scale_and_window(scale, window_left, window_right);
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, ", num(kMaxSplits),
                    "] (0 = automatic), got ", num(num_splits));
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const bool paged = block_table.has_value();
  const int64_t Hkv = paged ? k_cache.size(2) : k_cache.size(1);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache head_dim ", num(k_cache.size(3)), " must equal q head_dim ",
                    num(D));
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "q heads Hq=", num(Hq),
                    " must be a multiple of the cache's kv heads Hkv=", num(Hkv));
  TORCH_CHECK_VALUE(cache_seqlens.device() == q.device() && cache_seqlens.scalar_type() == at::kInt &&
                        cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                        (B <= 1 || cache_seqlens.stride(0) == 1),
                    "cache_seqlens must be a contiguous int32 tensor of shape (batch,) = (", num(B),
                    ",) on q's device, got ", dtype_name(cache_seqlens.scalar_type()), " ",
                    shape(cache_seqlens.sizes()), " on ", cache_seqlens.device().str());
  int64_t num_pages, page_size, max_pages;
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_VALUE(bt.device() == q.device() && bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == B &&
                          (bt.size(1) <= 1 || bt.stride(1) == 1),
                      "block_table must be int32 (batch=", num(B), ", max_pages) on q's device with a contiguous last "
                      "dim, got ", dtype_name(bt.scalar_type()), " ", shape(bt.sizes()), " on ", bt.device().str());
    num_pages = k_cache.size(0);
    page_size = k_cache.size(1);
    max_pages = bt.size(1);
    TORCH_CHECK_VALUE(page_size > 0 && num_pages > 0, "paged k_cache (num_pages, page_size, kv_heads, head_dim) has "
                      "shape ", shape(k_cache.sizes()), ": need num_pages >= 1 and page_size >= 1");
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, "contiguous k_cache (batch, kv_heads, max_seqlen, head_dim) has batch ",
                      num(k_cache.size(0)), " but q has ", num(B), " (a paged cache needs block_table)");
    num_pages = B;
    page_size = std::max<int64_t>(k_cache.size(2), 1);
    max_pages = k_cache.size(2) > 0 ? 1 : 0;
  }
  const int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(max_pages * page_size < int_max && num_pages < int_max && Sq * Hq < int_max && B * Hq < int_max,
                    "cache capacity and batch * heads * seqlen must be < 2**31 - 1");
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "k_new and v_new must be given together");
  int64_t seqlen_new = 0;
  if (k_new.has_value()) {
    check_cache_operand(*k_new, "k_new", q);
    check_cache_operand(*v_new, "v_new", q);
    const std::vector<int64_t> want{B, Hkv, Sq, D};
    TORCH_CHECK_VALUE(k_new->sizes() == at::IntArrayRef(want) && v_new->sizes() == at::IntArrayRef(want),
                      "k_new and v_new must be (batch, kv_heads, q seqlen, head_dim) = ", shape(at::IntArrayRef(want)),
                      ", got ", shape(k_new->sizes()), " and ", shape(v_new->sizes()));
    seqlen_new = Sq;
  }
  if (q_pos.has_value()) {  // per-row query positions (KvCacheParams::q_pos): rows not appended, nothing to infer
    const at::Tensor& qp = *q_pos;
    TORCH_CHECK_VALUE(qp.device() == q.device() && qp.scalar_type() == at::kInt && qp.dim() == 2 && qp.size(0) == B &&
                          qp.size(1) == Sq && qp.is_contiguous(),
                      "q_pos must be a contiguous int32 tensor of shape (batch, q seqlen) = (", num(B), ", ", num(Sq),
                      ") on q's device, got ", dtype_name(qp.scalar_type()), " ", shape(qp.sizes()), " on ",
                      qp.device().str());
    TORCH_CHECK_VALUE(!k_new.has_value(), "q_pos cannot be combined with k_new (appended rows sit at cache_seqlens)");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor out = at::empty_like(q);  // q's layout when q is dense, else contiguous
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));

  KvCacheParams p{};
  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.q_row_stride = q.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  if (paged) {  // (num_pages, page_size, Hkv, D)
    p.k_page_stride = k_cache.stride(0), p.k_row_stride = k_cache.stride(1), p.k_head_stride = k_cache.stride(2);
    p.v_page_stride = v_cache.stride(0), p.v_row_stride = v_cache.stride(1), p.v_head_stride = v_cache.stride(2);
    p.block_table = block_table->data_ptr<int>();
    p.block_table_stride = block_table->stride(0);
  } else {  // (B, Hkv, S_max, D): page b of S_max rows
    p.k_page_stride = k_cache.stride(0), p.k_row_stride = k_cache.stride(2), p.k_head_stride = k_cache.stride(1);
    p.v_page_stride = v_cache.stride(0), p.v_row_stride = v_cache.stride(2), p.v_head_stride = v_cache.stride(1);
    p.block_table = nullptr;
    p.block_table_stride = 0;
  }
  p.num_pages = static_cast<int>(num_pages);
  p.page_size = static_cast<int>(page_size);
  p.max_pages = static_cast<int>(max_pages);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  if (k_new.has_value()) {
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    p.kn_batch_stride = k_new->stride(0), p.kn_head_stride = k_new->stride(1), p.kn_row_stride = k_new->stride(2);
    p.vn_batch_stride = v_new->stride(0), p.vn_head_stride = v_new->stride(1), p.vn_row_stride = v_new->stride(2);
  }
  p.seqlen_new = static_cast<int>(seqlen_new);
  p.batch = static_cast<int>(B);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hkv);
  p.head_group = static_cast<int>(Hq / Hkv);
  p.seqlen_q = static_cast<int>(Sq);
  p.head_dim = static_cast<int>(D);
  fill_output_params(p, out, lse, scale);
  // A row sees at most capacity + seqlen_new keys (lengths are clamped to the capacity on the device).
  p.window_left = window_bound(window_left, max_pages * page_size + seqlen_new);
  // Bottom-right aligned rows lie within Sq of the last key; rows at given positions may lie anywhere.
  p.window_right = window_bound(window_right, q_pos.has_value() ? max_pages * page_size + seqlen_new : Sq);
  p.q_pos = q_pos.has_value() ? q_pos->data_ptr<int>() : nullptr;
  p.num_m_blocks = static_cast<int>((Sq * (Hq / Hkv) + kDecodeBlockM - 1) / kDecodeBlockM);

  FAE_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    decode_hdim_switch(D, [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      const int64_t rows = B * Hq * Sq;
      int sms = 0;  // host-side queries only: no sync, capture-safe
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()));
      const int64_t capacity = max_pages * page_size;
      const DecodePlan plan = decode_plan<T, kHeadDim>(p, sms, max_auto_splits(capacity));
      p.split_variant = plan.variant;
      int64_t splits = 1;
      if (rows > 0) {
        const int64_t base_blocks = static_cast<int64_t>(p.num_m_blocks) * B * (Hkv / plan.heads_per_block);
        splits = num_splits > 0 ? num_splits
                                : auto_num_splits(base_blocks, capacity, int64_t(sms) * plan.blocks_per_sm);
      }
      at::Tensor ws;
      if (splits > 1) {
        const int64_t per_split = rows * (D + 1);  // o (D floats) + lse per row
        if (workspace.has_value()) {
          ws = *workspace;
          TORCH_CHECK(ws.is_cuda() && ws.device() == q.device() && ws.scalar_type() == at::kFloat &&
                          ws.is_contiguous() && reinterpret_cast<uintptr_t>(ws.data_ptr()) % 16 == 0,
                      "workspace must be a contiguous, 16-byte aligned float32 tensor on q's device");
          const int64_t fit = ws.numel() / per_split;
          if (num_splits > 0)
            TORCH_CHECK(fit >= splits, "workspace has ", num(ws.numel()), " floats; num_splits=", num(splits),
                        " needs ", num(splits * per_split));
          splits = std::min(splits, fit);  // auto: as many splits as the workspace holds
        }
        if (splits > 1 && !ws.defined()) ws = at::empty({splits * per_split}, q.options().dtype(at::kFloat));
      }
      p.num_splits = static_cast<int>(std::max<int64_t>(splits, 1));
      if (p.num_splits > 1) {
        p.ws_o = ws.data_ptr<float>();
        p.ws_lse = p.ws_o + p.num_splits * rows * D;
      }
      if (rows == 0) p.num_m_blocks = 0;  // nothing to attend; the append (if any) still runs
      run_kvcache_fwd<T, kHeadDim>(p, stream);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                                                const at::Tensor& lse_b) {
  const char* names[] = {"o_a", "lse_a", "o_b", "lse_b"};
  const at::Tensor* tensors[] = {&o_a, &lse_a, &o_b, &lse_b};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK_VALUE(tensors[i]->device() == o_a.device(), names[i], " is on ", tensors[i]->device().str(),
                      " but o_a is on ", o_a.device().str());
  TORCH_CHECK_VALUE(o_a.dim() == 4 && o_a.sizes() == o_b.sizes(), "o_a and o_b must be (batch, heads, seqlen, "
                    "head_dim) of one shape, got ", shape(o_a.sizes()), " and ", shape(o_b.sizes()));
  TORCH_CHECK_TYPE(o_a.scalar_type() == o_b.scalar_type(), "o_a and o_b must have one floating dtype, got ",
                   dtype_name(o_a.scalar_type()), " and ", dtype_name(o_b.scalar_type()));
  const int64_t B = o_a.size(0), H = o_a.size(1), S = o_a.size(2), D = o_a.size(3);
  const std::vector<int64_t> lse_shape{B, H, S};
  for (int i : {1, 3})
    TORCH_CHECK_VALUE(tensors[i]->sizes() == at::IntArrayRef(lse_shape) && tensors[i]->scalar_type() == at::kFloat,
                      names[i], " must be float32 of shape ", shape(at::IntArrayRef(lse_shape)), ", got ",
                      dtype_name(tensors[i]->scalar_type()), " ", shape(tensors[i]->sizes()));
  TORCH_CHECK_VALUE(B * H * S < std::numeric_limits<int>::max() && D < std::numeric_limits<int>::max(),
                    "merge_states: batch * heads * seqlen and head_dim must be < 2**31 - 1");
  const c10::cuda::CUDAGuard guard(o_a.device());
  at::Tensor o = at::empty(o_a.sizes(), o_a.options());
  at::Tensor lse = at::empty({B, H, S}, o_a.options().dtype(at::kFloat));
  MergeStatesParams p{};
  p.o_a = o_a.data_ptr();
  p.o_b = o_b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  for (int d = 0; d < 4; ++d) p.oa_stride[d] = o_a.stride(d), p.ob_stride[d] = o_b.stride(d);
  for (int d = 0; d < 3; ++d) p.la_stride[d] = lse_a.stride(d), p.lb_stride[d] = lse_b.stride(d);
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.seqlen = static_cast<int>(S);
  p.head_dim = static_cast<int>(D);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (o_a.scalar_type()) {
    case at::kFloat: run_merge_states<float>(p, stream); break;
    case at::kHalf: run_merge_states<__half>(p, stream); break;
    case at::kBFloat16: run_merge_states<__nv_bfloat16>(p, stream); break;
    default: TORCH_CHECK_TYPE(false, "o_a.dtype must be one of ['float32', 'float16', 'bfloat16'] on CUDA, got ",
                              dtype_name(o_a.scalar_type()));
  }
  return {o, lse};
}

}  // namespace fae

#endif  // FAE_HAS_DECODE
