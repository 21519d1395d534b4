// Host side of TMA: tensor maps for (batch, head, seq, dim) tensors and packed (total_rows, head, dim) ones, with
// any strides and a contiguous last dim. cuTensorMapEncodeTiled is a driver API; it is looked up once through the
// runtime's entry-point query, so the extension needs no link against libcuda.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fae::sm90 {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error("flashattn_ext: cuTensorMapEncodeTiled is not available from the CUDA driver");
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// A stride for a dimension of size 1 is never used to address memory, but the encoder still wants a
// multiple of 16 bytes: give it one.
inline cuuint64_t tma_stride_bytes(int64_t stride_elems, int64_t size, int elem_bytes) {
  if (size <= 1) return 16;
  return static_cast<cuuint64_t>(stride_elems) * elem_bytes;
}

// Tensor map over a (batch, heads, seqlen, head_dim) tensor, dims innermost first: (head_dim, seq, head, batch).
// One box is box_rows rows x 64 columns (128 bytes): the 128-byte swizzle wgmma reads. Rows past seqlen read
// as zeros, so tiles at the end of a sequence need no bounds logic in the copy.
inline CUtensorMap make_bhsd_tmap(const void* base, bool bf16, int64_t batch, int64_t heads, int64_t seqlen,
                                  int64_t head_dim, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                                  int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seqlen),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {tma_stride_bytes(row_stride, seqlen, 2), tma_stride_bytes(head_stride, heads, 2),
                                 tma_stride_bytes(batch_stride, batch, 2)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = encode_tiled_fn()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void*>(base),
      dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS)
    throw std::runtime_error("flashattn_ext: cuTensorMapEncodeTiled failed (error " + std::to_string(res) +
                             "): strides must be multiples of 16 bytes and the data 16-byte aligned");
  return map;
}

// Tensor map over a packed (total_rows, heads, head_dim) tensor (varlen), described as (head_dim, total_rows,
// heads, 1): the kernels address both forms with the same 4-D copy, a sequence's rows at its first packed row.
// Rows past total_rows read as zeros.
inline CUtensorMap make_packed_tmap(const void* base, bool bf16, int64_t total_rows, int64_t heads, int64_t head_dim,
                                    int64_t head_stride, int64_t row_stride, int box_rows) {
  return make_bhsd_tmap(base, bf16, 1, heads, total_rows, head_dim, 0, head_stride, row_stride, box_rows);
}

}  // namespace fae::sm90
