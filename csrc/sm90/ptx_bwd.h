// Hopper PTX wrappers the backward adds to ptx.h: a 1-D bulk copy (row vectors next to the TMA tiles), the
// generic-to-async proxy fence (registers stored to shared memory before a wgmma or bulk copy reads them),
// and fp32 reduce-adds to global memory for the dQ accumulation: per thread (vector red) or per tile (bulk).
#pragma once
#include <cstdint>
#include "ptx.h"

namespace fae::sm90 {

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, completing
// on an mbarrier like the tensor copies.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// *addr += (x, y) for two adjacent floats (8-byte aligned), one relaxed atomic per pair.
__device__ __forceinline__ void red_add_v2(float* addr, float x, float y) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(addr), "f"(x), "f"(y) : "memory");
}

// dst[i] += src[i] for `bytes` of fp32 (a multiple of 16, both 16-byte aligned), shared -> global, in the
// async proxy; tracked by this thread's bulk groups.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
               ::"l"(reinterpret_cast<uint64_t>(dst)), "r"(smem_addr(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until at most kPending of this thread's bulk groups still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory"); }
// Until at most kPending of this thread's bulk groups are still incomplete (writes done).
template <int kPending>
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory"); }

}  // namespace fae::sm90
