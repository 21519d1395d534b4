// Host side of the kTmaRuns split-kernel variants (DecodeLoad in decode_common.cuh): the K and V caches as TMA
// tensor maps, and how many keys one tensor copy takes. Two cuTensorMapEncodeTiled calls per decode call (a
// host-only encoding, no device access, no sync: CUDA-graph capturable; the maps travel as kernel parameters).
#pragma once
#include <cuda.h>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include "../../common/params.h"
#include "../../sm90/tma.h"
#include "decode_common.cuh"

namespace fae {

// A stride the tensor map can take for a dimension of `size` (elements of 2 bytes): a positive multiple of 16
// bytes below 2^40. A dimension of size 1 is never stepped (sm90::tma_stride_bytes gives it a dummy 16).
inline bool decode_tma_stride_ok(int64_t stride, int64_t size) {
  return size <= 1 || (stride > 0 && (stride * 2) % 16 == 0 && stride * 2 < (int64_t(1) << 40));
}

// Keys per tensor copy for this cache, or 0 when the copies cannot be used (the kernel then copies every row
// with its own bulk copy, as the kBulkRows variant of the same shape):
//  * a copy takes consecutive keys of one page starting at a multiple of its size, so its size divides the tile
//    and the page size: gcd(page_size, kBlockN), a power of two; a contiguous cache is one page per sequence:
//    a whole tile (a box reaching past a short cache's capacity is never issued: the kernel copies a run only
//    when all its keys are keys of the sequence, so no box row is ever outside the page dimension);
//  * it lands at a 128-byte aligned shared-memory address: with rows (kHeadDim + 8) * 2 bytes apart (16 mod 128)
//    only every 8th row of a tile is, so at least 8 keys (page sizes 1, 2, 4 and any other size that is not a
//    multiple of 8 fall back: a 1-row copy would be the same number of requests as the bulk path anyway);
//  * one box row is kHeadDim + 8 elements (the tile's padded row), at most 256 (head dim <= 248);
//  * the map needs a 16-byte aligned base and strides that are positive multiples of 16 bytes (checked here; the
//    op's argument checks already ask for 8-element strides and 16-byte aligned caches, so this only falls back
//    for broadcast (stride 0) caches).
template <typename Tr>
int decode_tma_box_rows(const KvCacheParams& p) {
  if (p.max_pages <= 0 || p.k_cache == nullptr || p.v_cache == nullptr) return 0;  // an empty cache: no key to copy
  const bool contiguous = p.block_table == nullptr;
  const int rows = contiguous ? Tr::kBlockN : std::gcd(p.page_size, Tr::kBlockN);
  if (rows < 8 || Tr::KVTile::kPitch > 256) return 0;
  const auto base_ok = [](const void* b) { return reinterpret_cast<uintptr_t>(b) % 16 == 0; };
  const bool layout_ok =
      base_ok(p.k_cache) && base_ok(p.v_cache) && decode_tma_stride_ok(p.k_head_stride, p.heads_kv) &&
      decode_tma_stride_ok(p.k_row_stride, p.page_size) && decode_tma_stride_ok(p.k_page_stride, p.num_pages) &&
      decode_tma_stride_ok(p.v_head_stride, p.heads_kv) && decode_tma_stride_ok(p.v_row_stride, p.page_size) &&
      decode_tma_stride_ok(p.v_page_stride, p.num_pages);
  return layout_ok ? rows : 0;
}

// Tensor map over one cache as (head_dim, kv heads, page_size, num_pages), innermost first; one box is
// (kHeadDim + 8, 1, box_rows, 1): box_rows rows of one head of one page, each written to shared memory as one
// padded tile row (the 8 columns past head_dim are out of bounds: filled with zeros, never read). No swizzle:
// the tile's plain row-major layout, the one the kBulkRows copies produce.
template <typename Tr>
CUtensorMap decode_cache_tmap(const KvCacheParams& p, const void* base, int64_t page_stride, int64_t row_stride,
                              int64_t head_stride, int box_rows) {
  constexpr bool kBf16 = std::is_same_v<typename Tr::T, __nv_bfloat16>;
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(Tr::kHeadDim), static_cast<cuuint64_t>(p.heads_kv),
                              static_cast<cuuint64_t>(p.page_size), static_cast<cuuint64_t>(p.num_pages)};
  const cuuint64_t strides[3] = {sm90::tma_stride_bytes(head_stride, p.heads_kv, 2),
                                 sm90::tma_stride_bytes(row_stride, p.page_size, 2),
                                 sm90::tma_stride_bytes(page_stride, p.num_pages, 2)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(Tr::KVTile::kPitch), 1, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = sm90::encode_tiled_fn()(
      &map, kBf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void*>(base),
      dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS)  // decode_tma_box_rows checked what the encoder asks for: a failure here is a bug
    throw std::runtime_error("flashattn_ext: cuTensorMapEncodeTiled failed for the KV cache (error " +
                             std::to_string(res) + "); FAE_DECODE_VARIANT=bulk_4w3s avoids tensor maps");
  return map;
}

// The maps of one call (box_rows 0 and zeroed maps when the copies cannot be used: then nothing is encoded).
template <typename Tr>
DecodeTmaMaps decode_tma_maps(const KvCacheParams& p) {
  DecodeTmaMaps maps{};
  maps.box_rows = decode_tma_box_rows<Tr>(p);
  if (maps.box_rows > 0) {
    maps.k = decode_cache_tmap<Tr>(p, p.k_cache, p.k_page_stride, p.k_row_stride, p.k_head_stride, maps.box_rows);
    maps.v = decode_cache_tmap<Tr>(p, p.v_cache, p.v_page_stride, p.v_row_stride, p.v_head_stride, maps.box_rows);
  }
  return maps;
}

}  // namespace fae
