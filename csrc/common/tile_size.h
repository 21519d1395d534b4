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
                         : TileShape{128, 32, 8};  // D=256: 64-key tiles would need 202 KB of shared memory
}

// Backward tiles. dK/dV kernel: block_n keys per block, block_m queries per inner step; warps split the keys,
// d_split warps share a key slice and split D (the dK/dV accumulators, 2 * keys * D / threads floats, must fit).
// Deterministic dQ kernel: dq_block_m queries per block (dq_warps warps, 16 rows each), dq_block_n keys per step.
struct BwdTileShape {
  int block_m, block_n, warps, d_split;
  int dq_block_m, dq_block_n, dq_warps;
};

constexpr BwdTileShape fa2_bwd_tile(int head_dim) {
#ifdef FAE_BWD_TILE_D  // tuning: -DFAE_BWD_TILE_D=128 -DFAE_BWD_TILE_M=.. -DFAE_BWD_TILE_N=.. -DFAE_BWD_TILE_W=..
  if (head_dim == FAE_BWD_TILE_D) return BwdTileShape{FAE_BWD_TILE_M, FAE_BWD_TILE_N, FAE_BWD_TILE_W, 1, 64, 64, 4};
#endif
  // 16 keys per warp keeps dK + dV at D floats per thread; D = 256 splits D over 2 warps (recomputing S and dP
  // in both) and halves the query step so Q/dO double buffers fit the 163 KB of sm80 shared memory.
  return head_dim <= 128 ? BwdTileShape{64, 128, 8, 1, 64, 64, 4}
                         : BwdTileShape{32, 64, 8, 2, 64, 16, 4};
}

}  // namespace fae
