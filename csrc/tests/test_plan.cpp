// The launch planner (plan.hpp, defined in sel_decode.cu) as host functions: no GPU, no CUDA
// call. The device is a 132-SM sm_90 part with 227 KB of shared memory per block (the H100 and
// H200 the targets are measured on). These are the planner's own answers; the launcher may still
// change them on the device (shared memory that does not fit, clusters that would not all be
// resident, one stage where that makes more blocks resident), which the GPU suite covers.
// The NSA_SEL_DEBUG_* knobs must be unset: they force the plan (gpu_check.sh runs them only
// against the GPU suite).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "../src/cuda/plan.hpp"
#include "../src/dispatch.hpp"
#include "nsa_sel/params.hpp"

namespace {

using nsa_sel::DeviceInfo;

struct Plan {
  int splits, teams, stages;
};

// The planner's steps in the launcher's order (sel_decode_launch.cuh), before its device checks.
Plan plan_of(const NsaSelParams& p, const DeviceInfo& dev) {
  const int tile = nsa_sel::tile_bytes_for(p.d_k, p.d_v);
  const int max_teams = nsa_sel::max_teams_for(nsa_sel::m_tiles_for_heads(p.h), tile);
  const int max_stages = nsa_sel::max_stages_for(tile);
  int splits = nsa_sel::plan_splits(p, dev, tile, max_teams);
  const int teams = nsa_sel::plan_teams(p, dev, splits, tile, max_teams);
  return {splits, teams, nsa_sel::plan_stages(p, dev, splits, teams, tile, max_stages)};
}

NsaSelParams shape(int64_t b, int64_t g, int64_t h, int64_t dk, int64_t dv, int64_t s_kv,
                   int64_t n) {
  return nsa_sel::contiguous_params({b, 1, g, h, dk, dv, s_kv, n}, NSA_SEL_BF16);
}

const DeviceInfo kHopper{132, 9, 227 * 1024};

void expect_default_plan() {
  for (const char* knob : {"NSA_SEL_DEBUG_SPLITS", "NSA_SEL_DEBUG_STAGES", "NSA_SEL_DEBUG_TEAMS",
                           "NSA_SEL_DEBUG_EARLY_TMA", "NSA_SEL_DEBUG_NO_TMA"})
    ASSERT_EQ(std::getenv(knob), nullptr) << knob << " is set: these tests check the default plan";
}

// SPEC.md's model configs (n = 16 blocks of 64 tokens) at the batch sizes of PERF.md's targets:
// the plans the measurements in NOTES.md were taken with.
TEST(Plan, ModelConfigsOnHopper) {
  expect_default_plan();
  struct Row {
    const char* name;
    int64_t b, g, h, dk, dv, s_kv;
    Plan want;
  };
  for (const Row& r : {
           Row{"nsa27b B=1", 1, 4, 16, 192, 128, 65536, {16, 1, 2}},
           Row{"nsa27b B=2", 2, 4, 16, 192, 128, 65536, {8, 1, 2}},
           Row{"nsa27b B=8", 8, 4, 16, 192, 128, 65536, {2, 2, 2}},
           Row{"nsa27b B=16", 16, 4, 16, 192, 128, 65536, {2, 2, 2}},
           Row{"nsa27b B=64", 64, 4, 16, 192, 128, 65536, {1, 1, 2}},
           Row{"d128 B=1", 1, 4, 16, 128, 128, 32768, {16, 1, 2}},
           Row{"d128 B=4", 4, 4, 16, 128, 128, 32768, {4, 2, 2}},
           Row{"d128 B=16", 16, 4, 16, 128, 128, 32768, {2, 2, 2}},
           Row{"m125 B=1", 1, 2, 6, 64, 64, 8192, {16, 1, 2}},
           Row{"m125 B=2", 2, 2, 6, 64, 64, 8192, {16, 1, 2}},
           Row{"m125 B=4", 4, 2, 6, 64, 64, 8192, {8, 2, 2}},
           Row{"m125 B=16", 16, 2, 6, 64, 64, 8192, {2, 4, 2}},
           Row{"m125 B=64", 64, 2, 6, 64, 64, 8192, {1, 4, 2}},
           Row{"m125 B=128", 128, 2, 6, 64, 64, 8192, {1, 1, 6}},
       }) {
    const Plan got = plan_of(shape(r.b, r.g, r.h, r.dk, r.dv, r.s_kv, 16), kHopper);
    EXPECT_EQ(got.splits, r.want.splits) << r.name;
    EXPECT_EQ(got.teams, r.want.teams) << r.name;
    EXPECT_EQ(got.stages, r.want.stages) << r.name;
  }
}

// The early first-tile issue: where the blocks come in one wave of more than one per SM with 2
// stages (nsa27b B=64: 256 blocks of one split on 132 SMs), not where each has an SM (B=1: 64
// blocks of 16 splits), not over several waves or at more stages (where it measured no gain or
// a loss), and never with more than 32 ranges (the kernel finds the first tile in one chunk).
TEST(Plan, EarlyIssueInOneWaveOfTwoStageBlocks) {
  expect_default_plan();
  const NsaSelParams b64 = shape(64, 4, 16, 192, 128, 65536, 16);
  EXPECT_TRUE(nsa_sel::plan_early_issue(b64, kHopper, 256, 2));
  EXPECT_TRUE(nsa_sel::plan_early_issue(shape(64, 4, 16, 192, 128, 65536, 32), kHopper, 133, 2));
  EXPECT_TRUE(nsa_sel::plan_early_issue(b64, kHopper, 264, 2));
  EXPECT_FALSE(nsa_sel::plan_early_issue(b64, kHopper, 132, 2));
  EXPECT_FALSE(nsa_sel::plan_early_issue(b64, kHopper, 265, 2));
  EXPECT_FALSE(nsa_sel::plan_early_issue(b64, kHopper, 256, 6));
  EXPECT_FALSE(nsa_sel::plan_early_issue(shape(1, 4, 16, 192, 128, 65536, 16), kHopper, 64, 2));
  EXPECT_FALSE(nsa_sel::plan_early_issue(shape(64, 4, 16, 192, 128, 65536, 33), kHopper, 256, 2));
}

// The tensor-copy path is compiled into the kernel only where it was measured to pay: split rows
// (B=1: 16 splits), the split K/V kernel (one stage) and the early kernel; the plain streaming
// plans (one split: m125 B=128 with 6 stages, d128 B=64 with 3, m125 B=64 with four teams) take
// the kernel without it.
TEST(Plan, TensorCopyKernelWhereItPays) {
  expect_default_plan();
  EXPECT_TRUE(nsa_sel::plan_tma_kernel(16, false, false));
  EXPECT_TRUE(nsa_sel::plan_tma_kernel(2, false, false));
  EXPECT_TRUE(nsa_sel::plan_tma_kernel(1, true, false));
  EXPECT_TRUE(nsa_sel::plan_tma_kernel(1, false, true));
  EXPECT_FALSE(nsa_sel::plan_tma_kernel(1, false, false));
  // The model configs' plans above: m125 B=128 and B=64 and d128 B=64 run one split.
  EXPECT_EQ(plan_of(shape(128, 2, 6, 64, 64, 8192, 16), kHopper).splits, 1);
  EXPECT_EQ(plan_of(shape(64, 4, 16, 128, 128, 32768, 16), kHopper).splits, 1);
}

// What every plan must satisfy, over a grid of shapes: the kernels exist for 1, 2 and 4 teams;
// splits are a cluster size that divides the output columns (16 only for one m-tile, over at
// most half the SMs); blocks of several teams have an SM each; four teams only for 16 KB tiles,
// each team expecting 2 tiles or more; 2+ stages (one stage is the launcher's choice, never the
// planner's); no clusters before sm_90.
TEST(Plan, InvariantsOverShapes) {
  expect_default_plan();
  const DeviceInfo ampere{108, 8, 163 * 1024};
  int four_team_plans = 0, sixteen_split_plans = 0;
  for (const DeviceInfo& dev : {kHopper, ampere})
    for (int64_t b : {1, 2, 3, 4, 8, 16, 33, 64, 100, 128, 256, 1000})
      for (int64_t g : {1, 2, 4, 8})
        for (int64_t h : {1, 6, 16, 32, 64})
          for (auto [dk, dv] : {std::pair<int64_t, int64_t>{64, 64}, {128, 128}, {192, 128},
                                {256, 256}})
            for (int64_t s_kv : {64, 333, 8192})
              for (int64_t n : {1, 2, 4, 8, 9, 16, 32, 64}) {
                const NsaSelParams p = shape(b, g, h, dk, dv, s_kv, n);
                const Plan got = plan_of(p, dev);
                const std::string at = "b=" + std::to_string(b) + " g=" + std::to_string(g) +
                                       " h=" + std::to_string(h) + " d=" + std::to_string(dk) +
                                       "/" + std::to_string(dv) + " s_kv=" +
                                       std::to_string(s_kv) + " n=" + std::to_string(n) +
                                       " sm_" + std::to_string(dev.cc_major) + "0";
                const int tile = nsa_sel::tile_bytes_for(dk, dv);
                ASSERT_TRUE(got.teams == 1 || got.teams == 2 || got.teams == 4) << at;
                ASSERT_LE(got.teams, nsa_sel::max_teams_for(nsa_sel::m_tiles_for_heads(h), tile))
                    << at;
                ASSERT_TRUE(got.splits == 1 || got.splits == 2 || got.splits == 4 ||
                            got.splits == 8 || got.splits == 16)
                    << at;
                // 16-block clusters (non-portable): one m-tile, at most half the SMs.
                if (got.splits == 16) {
                  ++sixteen_split_plans;
                  ASSERT_LE(h, 16) << at;
                  ASSERT_LE(b * g * 16 * 2, dev.sm_count) << at;
                }
                ASSERT_LE(got.splits, nsa_sel::tiles_bound(p)) << at;
                if (dev.cc_major < 9) ASSERT_EQ(got.splits, 1) << at;
                if (got.teams > 1) ASSERT_LE(b * g * got.splits, dev.sm_count) << at;
                if (got.teams == 4) {
                  ++four_team_plans;
                  ASSERT_LE(tile, 16 * 1024) << at;
                  ASSERT_GE(n, 8 * got.splits) << at;
                  ASSERT_EQ(got.stages, 2) << at;
                }
                ASSERT_GE(got.stages, 2) << at;
                ASSERT_LE(got.stages, 6) << at;
                // Blocks with an SM each keep no stage beyond the tiles a team expects.
                const int64_t sets = got.splits * got.teams;
                const int64_t per_team = (nsa_sel::expected_tiles(p) + sets - 1) / sets;
                if (b * g * got.splits <= dev.sm_count)
                  ASSERT_LE(got.stages, std::max<int64_t>(2, per_team)) << at;
              }
  EXPECT_GT(four_team_plans, 0);     // the grid reaches the four-team rule
  EXPECT_GT(sixteen_split_plans, 0);  // and the 16-split one
}

}  // namespace
