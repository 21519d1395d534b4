// Tile shapes, one constexpr function per kernel. For mma.sync on sm80/sm90: 4 warps of 32 query rows (8 warps
// of 16 at D=256, whose accumulators would not fit otherwise); the key tile is the widest that stays under the
// 255-register cap without spilling (spills cost more than the extra loop iterations).
#pragma once

namespace fae {

struct TileShape {
  int block_m, block_n, warps;
  int stages = 2;  // K/V tiles in flight in the shared-memory ring (loads run stages-1 tiles ahead)
};

constexpr TileShape fa2_fwd_tile(int head_dim) {
#ifdef FAE_TILE_D  // tuning experiments: -DFAE_TILE_D=128 -DFAE_TILE_M=.. -DFAE_TILE_N=.. -DFAE_TILE_W=.. -DFAE_TILE_S=..
  if (head_dim == FAE_TILE_D) return TileShape{FAE_TILE_M, FAE_TILE_N, FAE_TILE_W, FAE_TILE_S};
#endif
  // Measured on H100 (bench/variants.sh, 2026-11-24): D128 with 64-key tiles spilled at the 255-register cap
  // and ran 0.74-0.84x SDPA flash; 32-key tiles ran 0.86-0.91x. D64: 64-key tiles 0.97-1.02x, 128-key 0.90-0.93x.
  return head_dim <= 32 ? TileShape{128, 128, 4}
       : head_dim <= 64 ? TileShape{128, 64, 4}
       : head_dim <= 128 ? TileShape{128, 32, 4}
                         : TileShape{128, 64, 8};
}

}  // namespace fae
