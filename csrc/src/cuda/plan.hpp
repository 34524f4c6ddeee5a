// The launch planner's host functions (defined in sel_decode.cu): how many blocks per (b, g) row
// (splits), warp teams per block and pipeline stages per team, from shapes and the device only.
// Host-only, so that the planner's tests (csrc/tests/test_plan.cpp) need neither nvcc nor a GPU.
#pragma once

#include <cstdint>

#include "nsa_sel/sel_attention.h"

namespace nsa_sel {

struct DeviceInfo {
  int sm_count = 0;
  int cc_major = 0;
  int max_smem_optin = 0;
};

constexpr int kTileTokens = 64;  // tokens per K/V tile (a pipeline stage)

// Bytes of one tile of 16-bit K and V rows.
constexpr int tile_bytes_for(int64_t d_k, int64_t d_v) {
  return static_cast<int>(kTileTokens * (d_k + d_v) * 2);
}

// The most pipeline stages of a team: about 200 KB of tiles (for a block alone on its SM), 2 to 6.
constexpr int max_stages_for(int tile_bytes) {
  return 200 * 1024 / tile_bytes < 2   ? 2
         : 200 * 1024 / tile_bytes > 6 ? 6
                                       : 200 * 1024 / tile_bytes;
}

// Warp teams a block may hold: blocks of one m-tile (h <= 16) two, or four where the tiles are of
// at most 16 KB (d_k = d_v = 64: 2 stages of each of four teams still fit an SM); one otherwise.
constexpr int max_teams_for(int m_tiles, int tile_bytes) {
  return m_tiles != 1 ? 1 : tile_bytes <= 16 * 1024 ? 4 : 2;
}

// 64-token tiles a row can hold at most (n ranges of at most s_kv tokens), at least 1.
int64_t tiles_bound(const NsaSelParams& p);
// The tiles a row is expected to hold: n (an NSA selection of n blocks of 64 tokens), within
// tiles_bound; for a single range, its length bound.
int64_t expected_tiles(const NsaSelParams& p);

// Splits per (b, g) row, pipeline stages per team and warp teams per block (see sel_decode.cu).
// Each honours its NSA_SEL_DEBUG_* knob (read once per process) before its rule.
int plan_splits(const NsaSelParams& p, const DeviceInfo& dev, int tile_bytes, int max_teams);
int plan_stages(const NsaSelParams& p, const DeviceInfo& dev, int splits, int teams, int tile_bytes,
                int max_stages);
// Whether NSA_SEL_DEBUG_STAGES forces the stage count (the launcher then keeps it as it is).
bool stages_forced();
int plan_teams(const NsaSelParams& p, const DeviceInfo& dev, int& splits, int tile_bytes,
               int max_teams);

// Whether a one-team block of one m-tile runs the split K/V pipeline (see the kernel's main
// loop): where it runs one stage.
bool plan_kv_split(int stages);

// Whether a one-team block of one m-tile and 2+ stages reads its ranges ahead of the wait for the
// previous kernel and issues its first tiles right after it (the kernel's EARLY variant), for a
// launch of `blocks` blocks of `stages` stages.
bool plan_early_issue(const NsaSelParams& p, const DeviceInfo& dev, int64_t blocks, int stages);
// Whether the launch takes a kernel with the tensor-copy path compiled in (else the same kernel
// without it, every tile by cp.async): where rows are split (few tiles a block, the first tile's
// latency exposed), in the split K/V kernel and in the early kernel.
bool plan_tma_kernel(int splits, bool kv_split, bool early);
// NSA_SEL_DEBUG_EARLY_TMA=3 (tests): as 2, and the EARLY kernel takes the check of the ranges it
// read ahead as failed, so that it always runs its start-over path.
bool early_recheck_forced();

// Main-loop rounds before the end at which a block lets the next kernel launch (see the kernel).
int plan_pdl_lead();

// Under NSA_SEL_DEBUG_PLAN=1, prints a launch's final plan once per distinct plan (stderr).
void report_plan(const NsaSelParams& p, int splits, int teams, int stages, bool kv_split, int smem,
                 bool tma, bool early);

}  // namespace nsa_sel
