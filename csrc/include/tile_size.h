// Tile shapes, one constexpr function per kernel. Chosen for mma.sync on sm80/sm90: 4 warps of 32 query rows
// (8 warps of 16 at D=256, whose accumulators would not fit otherwise); wide key tiles where D is small so
// each K/V byte loaded into shared memory feeds more tensor-core work.
#pragma once

namespace fae {

struct TileShape {
  int block_m, block_n, warps;
};

constexpr TileShape fa2_fwd_tile(int head_dim) {
  return head_dim <= 64 ? TileShape{128, 128, 4}
       : head_dim <= 128 ? TileShape{128, 64, 4}
                         : TileShape{128, 64, 8};
}

}  // namespace fae
