// GPU suite: the CUDA decode kernel against the C++ CPU reference (nsa_sel_reference_cpu).
// Every test needs a CUDA device; without one each test is reported as SKIPPED (ctest marks the
// suite with the "gpu" label, and the CPU-only CI run excludes it).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../src/internal.hpp"  // half/bf16 conversions (exhaustively tested on the CPU)
#include "nsa_sel/params.hpp"
#include "nsa_sel/sel_attention.h"

namespace {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

bool has_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define REQUIRE_GPU() \
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device"

struct Case {
  int dtype = NSA_SEL_BF16;
  int64_t b = 1, g = 1, h = 16, d_k = 64, d_v = 64, s_kv = 256, n = 4;
  bool kv_lens = false;
  bool int64_ranges = false;
  int64_t kv_pad = 0;  // extra tokens allocated past s_kv (strided cache slice)
};

// Host data + device buffers of one call, with contiguous layouts except that K/V live in a
// cache of s_kv + kv_pad tokens (a slice of a larger preallocated cache).
struct Problem {
  Case c;
  int64_t s_alloc;
  std::vector<uint16_t> q, k, v, out;
  std::vector<int64_t> ranges;
  std::vector<int64_t> kv_lens;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *dr = nullptr, *dl = nullptr, *dout = nullptr;

  explicit Problem(const Case& cc, uint64_t seed) : c(cc), s_alloc(cc.s_kv + cc.kv_pad) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    q.resize(c.b * c.g * c.h * c.d_k);
    k.resize(c.b * c.g * s_alloc * c.d_k);
    v.resize(c.b * c.g * s_alloc * c.d_v);
    out.assign(c.b * c.g * c.h * c.d_v, 0);
    for (auto& x : q) x = from_f(normal(rng));
    for (auto& x : k) x = from_f(normal(rng));
    for (auto& x : v) x = from_f(normal(rng));
    kv_lens.resize(c.b);
    std::uniform_int_distribution<int64_t> len_d(std::max<int64_t>(c.s_kv / 2, 0), c.s_kv);
    for (auto& l : kv_lens) l = c.kv_lens ? len_d(rng) : c.s_kv;
    // Ranges anywhere: mostly inside [0, s_kv), some negative, reversed, past the limit, empty.
    ranges.resize(c.b * c.g * c.n * 2);
    std::uniform_int_distribution<int64_t> pos(-8, c.s_kv + 8);
    std::uniform_int_distribution<int64_t> len(0, 80);
    for (int64_t i = 0; i < c.b * c.g * c.n; ++i) {
      const int64_t s0 = pos(rng);
      ranges[2 * i] = s0;
      ranges[2 * i + 1] = (i % 7 == 3) ? s0 - 5 : s0 + len(rng);
    }
  }

  ~Problem() {
    for (void* p : {dq, dk, dv, dr, dl, dout}) cudaFree(p);
  }

  NsaSelParams params(bool device) const {
    const NsaSelIndexType idx = c.int64_ranges ? NSA_SEL_I64 : NSA_SEL_I32;
    NsaSelParams p = nsa_sel::contiguous_params({c.b, 1, c.g, c.h, c.d_k, c.d_v, c.s_kv, c.n},
                                                static_cast<NsaSelDtype>(c.dtype), idx, idx);
    // K/V live in a cache of s_alloc tokens: a slice of a larger preallocated cache.
    p.k_stride_g = s_alloc * c.d_k;
    p.k_stride_b = c.g * p.k_stride_g;
    p.v_stride_g = s_alloc * c.d_v;
    p.v_stride_b = c.g * p.v_stride_g;
    p.q = device ? dq : q.data();
    p.k = device ? dk : k.data();
    p.v = device ? dv : v.data();
    p.ranges = device ? dr : ranges_host();
    p.kv_lens = c.kv_lens ? (device ? dl : lens_host()) : nullptr;
    p.out = device ? dout : const_cast<uint16_t*>(out.data());
    return p;
  }

  // Ranges / kv_lens in the index type of the case.
  const void* ranges_host() const { return c.int64_ranges ? (const void*)ranges.data() : r32(); }
  const void* lens_host() const { return c.int64_ranges ? (const void*)kv_lens.data() : l32(); }
  const void* r32() const {
    r32_.assign(ranges.begin(), ranges.end());
    return r32_.data();
  }
  const void* l32() const {
    l32_.assign(kv_lens.begin(), kv_lens.end());
    return l32_.data();
  }
  mutable std::vector<int32_t> r32_, l32_;

  void upload() {
    auto put = [](void** d, const void* h, size_t bytes) {
      ASSERT_EQ(cudaMalloc(d, std::max<size_t>(bytes, 16)), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(*d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    };
    const size_t isz = c.int64_ranges ? 8 : 4;
    put(&dq, q.data(), q.size() * 2);
    put(&dk, k.data(), k.size() * 2);
    put(&dv, v.data(), v.size() * 2);
    put(&dr, ranges_host(), ranges.size() * isz);
    put(&dl, lens_host(), kv_lens.size() * isz);
    ASSERT_EQ(cudaMalloc(&dout, out.size() * 2), cudaSuccess);
    // Poison the output: every element must be written.
    ASSERT_EQ(cudaMemset(dout, 0xff, out.size() * 2), cudaSuccess);
  }

  std::vector<uint16_t> run_gpu(cudaStream_t stream = nullptr) {
    NsaSelParams p = params(true);
    const NsaSelStatus st = nsa_sel_decode_cuda(&p, 0, stream);
    EXPECT_EQ(st, NSA_SEL_OK) << nsa_sel_last_error();
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<uint16_t> got(out.size());
    EXPECT_EQ(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    return got;
  }

  std::vector<uint16_t> run_cpu() {
    NsaSelParams p = params(false);
    std::vector<uint16_t> ref(out.size(), 0);
    p.out = ref.data();
    EXPECT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_OK) << nsa_sel_last_error();
    return ref;
  }

  float to_f(uint16_t x) const {
    return c.dtype == NSA_SEL_BF16 ? nsa_sel::bf16_to_float(x) : nsa_sel::half_to_float(x);
  }
  uint16_t from_f(float f) const {
    return c.dtype == NSA_SEL_BF16 ? nsa_sel::float_to_bf16(f) : nsa_sel::float_to_half(f);
  }
};

void expect_close(const Problem& pr, const std::vector<uint16_t>& got,
                  const std::vector<uint16_t>& ref) {
  // The kernel rounds P to the input dtype before P V (like FlashAttention); the reference keeps
  // it in fp32. Both round the output once.
  const float tol = pr.c.dtype == NSA_SEL_BF16 ? 2e-2f : 3e-3f;
  double sum_err = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float a = pr.to_f(got[i]), r = pr.to_f(ref[i]);
    ASSERT_TRUE(std::isfinite(a)) << "element " << i << " not written or not finite: " << a;
    const float err = std::fabs(a - r);
    sum_err += err;
    if (err > tol * (1.f + std::fabs(r))) ++bad;
  }
  EXPECT_EQ(bad, 0) << "elements outside tolerance";
  EXPECT_LE(sum_err / got.size(), 1e-3) << "mean absolute error";
}

struct Dims {
  int64_t d_k, d_v;
};

class ParityGrid : public ::testing::TestWithParam<std::tuple<int, Dims, int64_t>> {};

TEST_P(ParityGrid, MatchesCpuReference) {
  REQUIRE_GPU();
  const auto [dtype, dims, h] = GetParam();
  uint64_t seed = 1;
  // On a 132-SM H100, where h <= 16: one row (16 splits; 2 warp teams for 16 KB tiles), 6 rows (4
  // splits, capped by the tiles a row can hold; 1 team: too few tiles), 32 rows (2 splits and 2
  // teams instead of 4 splits), 40 rows (2 splits; 2 teams for 16 KB tiles), 100 rows (unsplit, 2
  // teams), 800 rows (one block per row, 1 team; 3 pipeline stages for 16 KB tiles). Where h > 16
  // (one team): 8, 4, 4, 2, 2 (16 KB tiles) or 1, and 1 splits.
  for (const auto& shape : {std::make_tuple<int64_t, int64_t, int64_t, int64_t>(1, 1, 1999, 37),
                            std::make_tuple<int64_t, int64_t, int64_t, int64_t>(2, 3, 65, 3),
                            std::make_tuple<int64_t, int64_t, int64_t, int64_t>(16, 2, 600, 9),
                            std::make_tuple<int64_t, int64_t, int64_t, int64_t>(20, 2, 300, 5),
                            std::make_tuple<int64_t, int64_t, int64_t, int64_t>(100, 1, 700, 9),
                            std::make_tuple<int64_t, int64_t, int64_t, int64_t>(200, 4, 100, 2)}) {
    Case c;
    c.dtype = dtype;
    c.d_k = dims.d_k;
    c.d_v = dims.d_v;
    c.h = h;
    std::tie(c.b, c.g, c.s_kv, c.n) = shape;
    c.kv_lens = seed % 2 == 0;
    c.int64_ranges = seed % 3 == 0;
    c.kv_pad = seed % 2 == 1 ? 24 : 0;
    Problem pr(c, seed++);
    pr.upload();
    const auto got = pr.run_gpu();
    const auto ref = pr.run_cpu();
    SCOPED_TRACE(::testing::Message() << "b=" << c.b << " g=" << c.g << " s_kv=" << c.s_kv
                                      << " n=" << c.n << " h=" << c.h << " dk=" << c.d_k);
    expect_close(pr, got, ref);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernel, ParityGrid,
                         ::testing::Combine(::testing::Values(int(NSA_SEL_BF16), int(NSA_SEL_F16)),
                                            ::testing::Values(Dims{64, 64}, Dims{128, 128},
                                                              Dims{192, 128}, Dims{256, 256}),
                                            ::testing::Values(int64_t{1}, int64_t{6}, int64_t{16},
                                                              int64_t{33}, int64_t{64})));

// Many more rows than resident blocks (several waves), mixed with sequences whose cache is still
// empty (kv_len 0: their rows select nothing and must come out as exact zeros), rows of 0 to 10
// tiles and rows cut short by kv_lens: a serving batch where new sequences join. The second
// case (320 rows of 40 KB tiles, n = 8) is one the launcher plans with one stage (v13), so it
// runs the split K/V kernel (v14) under the default plan, not only under `stages1`.
TEST(Decode, ManyWavesWithEmptySequences) {
  REQUIRE_GPU();
  uint64_t seed = 101;
  for (const auto& [b, s_kv, n, d_k, d_v, h, dtype] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>{
            500, 256, 4, 64, 64, 16, NSA_SEL_BF16},
        {160, 500, 8, 192, 128, 5, NSA_SEL_F16}}) {
    Case c;
    c.dtype = dtype;
    c.b = b;
    c.g = 2;
    c.s_kv = s_kv;
    c.n = n;
    c.d_k = d_k;
    c.d_v = d_v;
    c.h = h;
    c.kv_lens = true;
    c.int64_ranges = dtype == NSA_SEL_F16;
    c.kv_pad = 8;
    Problem pr(c, seed++);
    for (int64_t i = 0; i < c.b; i += 17) pr.kv_lens[i] = 0;
    pr.upload();
    const auto got = pr.run_gpu();
    const auto ref = pr.run_cpu();
    SCOPED_TRACE(::testing::Message() << "b=" << c.b << " s_kv=" << c.s_kv << " n=" << c.n
                                      << " h=" << c.h << " dk=" << c.d_k);
    expect_close(pr, got, ref);
    const int64_t per_b = c.g * c.h * c.d_v;
    for (int64_t i = 0; i < c.b; i += 17)
      for (int64_t e = 0; e < per_b; ++e)
        ASSERT_EQ(got[i * per_b + e], 0) << "row of sequence " << i << " (kv_len 0) not zero";
  }
}

TEST(Decode, EmptySelectionGivesExactZeros) {
  REQUIRE_GPU();
  Case c;
  c.b = 3;
  c.g = 2;
  c.n = 5;
  Problem pr(c, 7);
  for (size_t i = 0; i < pr.ranges.size(); i += 2) {  // all empty after clamping
    pr.ranges[i] = (i / 2) % 2 ? -10 : c.s_kv + 3;
    pr.ranges[i + 1] = (i / 2) % 2 ? 0 : c.s_kv + 50;
  }
  pr.upload();
  for (uint16_t x : pr.run_gpu()) ASSERT_EQ(x, 0) << "expected +0.0 bits";
}

TEST(Decode, UnselectedNanNeverRead) {
  REQUIRE_GPU();
  Case c;
  c.b = 2;
  c.g = 2;
  c.s_kv = 512;
  c.n = 3;
  c.kv_lens = true;
  Problem pr(c, 11);
  // Mark selected tokens; poison every other K/V row (including rows past kv_lens) with NaN.
  const uint16_t nan = 0x7fc0;
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t g = 0; g < c.g; ++g) {
      std::vector<bool> sel(c.s_kv, false);
      for (int64_t i = 0; i < c.n; ++i) {
        const int64_t base = ((b * c.g + g) * c.n + i) * 2;
        const int64_t s0 = std::max<int64_t>(pr.ranges[base], 0);
        const int64_t e0 = std::min(pr.ranges[base + 1], pr.kv_lens[b]);
        for (int64_t t = s0; t < e0; ++t) sel[t] = true;
      }
      for (int64_t t = 0; t < pr.s_alloc; ++t) {
        if (t < c.s_kv && sel[t]) continue;
        for (int64_t d = 0; d < c.d_k; ++d)
          pr.k[((b * c.g + g) * pr.s_alloc + t) * c.d_k + d] = nan;
        for (int64_t d = 0; d < c.d_v; ++d)
          pr.v[((b * c.g + g) * pr.s_alloc + t) * c.d_v + d] = nan;
      }
    }
  pr.upload();
  const auto got = pr.run_gpu();
  expect_close(pr, got, pr.run_cpu());
}

// NSA's own selection: n blocks of 64 tokens (aligned and not), a few of 128 or 32, the last one
// of each sequence cut by kv_lens; K/V rows outside the selection are NaN. Whole 64-token tiles
// inside one range are read by tensor copies (sm_90), the others by cp.async, so every tile kind
// meets in one row, in grids of one row (16 splits), a few and many rows, every head dim, with
// the cache a strided slice.
TEST(Decode, BlockSelectionsTensorCopies) {
  REQUIRE_GPU();
  uint64_t seed = 31;
  for (const auto& [b, g, h, d_k, d_v, n, dtype] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>{
            1, 4, 16, 192, 128, 16, NSA_SEL_BF16},
        {3, 2, 64, 128, 128, 12, NSA_SEL_F16},
        {60, 4, 16, 192, 128, 16, NSA_SEL_BF16},
        {9, 1, 8, 64, 64, 7, NSA_SEL_F16},
        {2, 3, 16, 256, 256, 10, NSA_SEL_BF16}}) {
    Case c;
    c.dtype = dtype;
    c.b = b;
    c.g = g;
    c.h = h;
    c.d_k = d_k;
    c.d_v = d_v;
    c.n = n;
    c.s_kv = 4096;
    c.kv_lens = true;
    c.kv_pad = 40;
    Problem pr(c, seed++);
    std::mt19937_64 rng(seed);
    const uint16_t nan = 0x7fc0;
    for (int64_t bb = 0; bb < c.b; ++bb) {
      pr.kv_lens[bb] = c.s_kv - 20 - static_cast<int64_t>(rng() % 40);
      for (int64_t gg = 0; gg < c.g; ++gg) {
        std::vector<bool> sel(pr.s_alloc, false);
        for (int64_t i = 0; i < c.n; ++i) {
          const int64_t base = ((bb * c.g + gg) * c.n + i) * 2;
          const int64_t len = i % 5 == 1 ? 128 : i % 5 == 3 ? 32 : 64;
          int64_t s0 = static_cast<int64_t>(rng() % (c.s_kv - 128));
          if (i % 2 == 0) s0 &= ~int64_t{63};           // block-aligned
          if (i == c.n - 1) s0 = pr.kv_lens[bb] - 30;   // the current block, cut by kv_lens
          pr.ranges[base] = s0;
          pr.ranges[base + 1] = s0 + len;
          for (int64_t t = s0; t < std::min(s0 + len, pr.kv_lens[bb]); ++t) sel[t] = true;
        }
        for (int64_t t = 0; t < pr.s_alloc; ++t) {
          if (sel[t]) continue;
          for (int64_t d = 0; d < c.d_k; ++d)
            pr.k[((bb * c.g + gg) * pr.s_alloc + t) * c.d_k + d] = nan;
          for (int64_t d = 0; d < c.d_v; ++d)
            pr.v[((bb * c.g + gg) * pr.s_alloc + t) * c.d_v + d] = nan;
        }
      }
    }
    pr.upload();
    SCOPED_TRACE(::testing::Message() << "b=" << c.b << " g=" << c.g << " h=" << c.h
                                      << " dk=" << c.d_k << " n=" << c.n);
    expect_close(pr, pr.run_gpu(), pr.run_cpu());
  }
}

// Scores that climb along the selection (K rows scaled by a ramp over the tokens, rising in
// group 0, falling in group 1): the online softmax's running maximum moves at nearly every tile
// in some rows and never after the first in others, over 16 tiles per row, in a grid of more
// blocks than SMs. A few tokens dominate such rows, so V is scaled by 1/4 to keep the output's
// own rounding (one bf16 ulp of values near 1) well inside the mean-error bar; a missed or
// doubled rescale of O would still be off by far more.
TEST(Decode, GrowingScoresAcrossTiles) {
  REQUIRE_GPU();
  for (const int dtype : {int(NSA_SEL_BF16), int(NSA_SEL_F16)}) {
    Case c;
    c.dtype = dtype;
    c.b = 100;
    c.g = 2;
    c.s_kv = 1024;
    c.n = 1;
    Problem pr(c, 21);
    for (int64_t row = 0; row < c.b * c.g; ++row) {
      pr.ranges[2 * row] = 0;
      pr.ranges[2 * row + 1] = c.s_kv;
      const bool rising = row % c.g == 0;
      for (int64_t t = 0; t < c.s_kv; ++t) {
        const float x = static_cast<float>(rising ? t : c.s_kv - 1 - t) / c.s_kv;
        const float ramp = 0.25f + 6.f * x;
        for (int64_t d = 0; d < c.d_k; ++d) {
          uint16_t& e = pr.k[(row * pr.s_alloc + t) * c.d_k + d];
          e = pr.from_f(pr.to_f(e) * ramp);
        }
        for (int64_t d = 0; d < c.d_v; ++d) {
          uint16_t& e = pr.v[(row * pr.s_alloc + t) * c.d_v + d];
          e = pr.from_f(pr.to_f(e) * 0.25f);
        }
      }
    }
    pr.upload();
    SCOPED_TRACE(dtype == NSA_SEL_BF16 ? "bf16" : "f16");
    expect_close(pr, pr.run_gpu(), pr.run_cpu());
  }
}

TEST(Decode, RepeatedRunsAreBitwiseEqual) {
  REQUIRE_GPU();
  Case c;
  c.b = 1;
  c.g = 2;
  c.s_kv = 4096;
  c.n = 32;  // few rows: the cluster split-KV combine is on this path
  Problem pr(c, 5);
  pr.upload();
  const auto first = pr.run_gpu();
  for (int i = 0; i < 5; ++i) ASSERT_EQ(pr.run_gpu(), first);
}

TEST(Decode, GraphCaptureReplaysWithNewRanges) {
  REQUIRE_GPU();
  Case c;
  c.b = 2;
  c.g = 2;
  c.s_kv = 1024;
  c.n = 8;
  Problem pr(c, 9);
  pr.upload();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  NsaSelParams p = pr.params(true);
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  ASSERT_EQ(nsa_sel_decode_cuda(&p, 0, stream), NSA_SEL_OK) << nsa_sel_last_error();
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  // New ranges, same buffers: the replay must use them (the grid never depends on contents).
  for (size_t i = 0; i < pr.ranges.size(); i += 2) {
    pr.ranges[i] = static_cast<int64_t>((i * 37) % 900);
    pr.ranges[i + 1] = pr.ranges[i] + 64;
  }
  CUDA_OK(cudaMemcpy(pr.dr, pr.ranges_host(), pr.ranges.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<uint16_t> got(pr.out.size());
  CUDA_OK(cudaMemcpy(got.data(), pr.dout, got.size() * 2, cudaMemcpyDeviceToHost));
  expect_close(pr, got, pr.run_cpu());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// Ranges that the previous kernel in the stream writes: the call must see what it wrote, also
// where its blocks start before that kernel ends (programmatic dependent launch) and read the
// ranges ahead (the EARLY kernel, taken where the plan allows it, everywhere under
// NSA_SEL_DEBUG_EARLY_TMA=2 or 3, as gpu_check's `early` steps run this suite). The first call
// (one long row, V = 0) writes exact zeros into its output, which the second call reads as its
// ranges: all empty, so its output must be exact zeros. Before the first call, that buffer holds
// valid ranges, which a read ahead of the first call's end would see; used unchecked, they would
// give a non-zero output.
TEST(Decode, RangesWrittenByThePreviousKernel) {
  REQUIRE_GPU();
  Case c1;
  c1.b = 1;
  c1.g = 1;
  c1.h = 32;  // an output of 4 KB: the ranges of 64 x 4 rows of 2
  c1.s_kv = 65536;
  c1.n = 1;
  Problem producer(c1, 41);
  producer.ranges[0] = 0;
  producer.ranges[1] = c1.s_kv;  // 1024 tiles: long enough for the next call to start early
  std::fill(producer.v.begin(), producer.v.end(), uint16_t{0});
  producer.upload();
  for (const auto& [b, g, d_k, d_v] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 4, 192, 128},
                                       {64, 4, 192, 128}, {64, 2, 64, 64}}) {
    Case c2;
    c2.b = b;
    c2.g = g;
    c2.d_k = d_k;
    c2.d_v = d_v;
    c2.n = 2;
    c2.s_kv = 512;
    Problem pr(c2, 43);
    for (size_t i = 0; i < pr.ranges.size(); i += 2) {  // the stale ranges: 64-token blocks
      pr.ranges[i] = static_cast<int64_t>((i * 32) % 448) & ~int64_t{63};
      pr.ranges[i + 1] = pr.ranges[i] + 64;
    }
    pr.upload();
    const size_t r_bytes = pr.ranges.size() * 4;
    ASSERT_LE(r_bytes, producer.out.size() * 2);
    NsaSelParams p1 = producer.params(true);
    NsaSelParams p2 = pr.params(true);
    p2.ranges = producer.dout;
    SCOPED_TRACE(::testing::Message() << "b=" << b << " g=" << g << " dk=" << d_k);
    for (int rep = 0; rep < 3; ++rep) {
      CUDA_OK(cudaMemcpy(producer.dout, pr.ranges_host(), r_bytes, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemset(pr.dout, 0xff, pr.out.size() * 2));
      ASSERT_EQ(nsa_sel_decode_cuda(&p1, 0, nullptr), NSA_SEL_OK) << nsa_sel_last_error();
      ASSERT_EQ(nsa_sel_decode_cuda(&p2, 0, nullptr), NSA_SEL_OK) << nsa_sel_last_error();
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint16_t> got(pr.out.size());
      CUDA_OK(cudaMemcpy(got.data(), pr.dout, got.size() * 2, cudaMemcpyDeviceToHost));
      int64_t nonzero = 0;
      for (const uint16_t x : got) nonzero += x != 0;
      ASSERT_EQ(nonzero, 0) << "outputs not exactly zero (of " << got.size() << "), rep " << rep;
    }
  }
}

// The call's device is current only during the call: the caller's current device (a C++
// engine's, or PyTorch's, which reads it back with cudaGetDevice) is the same afterwards. An
// invalid device is reported, and its error is not left pending for the next call's launch
// check to trip on. With 2+ GPUs, a call on device 1 from a thread on device 0 is checked too.
TEST(Decode, LeavesTheCurrentDeviceAlone) {
  REQUIRE_GPU();
  int count = 0;
  CUDA_OK(cudaGetDeviceCount(&count));
  CUDA_OK(cudaSetDevice(0));
  Case c;
  c.b = 2;
  c.g = 2;
  c.s_kv = 300;
  c.n = 4;
  Problem pr(c, 9);
  pr.upload();
  NsaSelParams p = pr.params(true);
  EXPECT_EQ(nsa_sel_decode_cuda(&p, count, nullptr), NSA_SEL_ERR_NO_DEVICE);
  EXPECT_NE(std::string(nsa_sel_last_error()).find("cudaSetDevice"), std::string::npos)
      << nsa_sel_last_error();
  int cur = -1;
  CUDA_OK(cudaGetDevice(&cur));
  EXPECT_EQ(cur, 0);
  expect_close(pr, pr.run_gpu(), pr.run_cpu());  // the failed call left nothing pending
  CUDA_OK(cudaGetDevice(&cur));
  EXPECT_EQ(cur, 0);
  if (count >= 2) {
    CUDA_OK(cudaSetDevice(1));
    Problem pr1(c, 10);
    pr1.upload();  // buffers on device 1
    CUDA_OK(cudaSetDevice(0));
    NsaSelParams p1 = pr1.params(true);
    EXPECT_EQ(nsa_sel_decode_cuda(&p1, 1, nullptr), NSA_SEL_OK) << nsa_sel_last_error();
    CUDA_OK(cudaGetDevice(&cur));
    EXPECT_EQ(cur, 0);
    CUDA_OK(cudaSetDevice(1));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> got(pr1.out.size());
    CUDA_OK(cudaMemcpy(got.data(), pr1.dout, got.size() * 2, cudaMemcpyDeviceToHost));
    expect_close(pr1, got, pr1.run_cpu());
    CUDA_OK(cudaSetDevice(0));
  }
}

TEST(Decode, UnsupportedConfigurationsAreReported) {
  REQUIRE_GPU();
  Case c;
  Problem pr(c, 3);
  pr.upload();
  NsaSelParams p = pr.params(true);
  p.d_k = p.d_v = 96;  // not instantiated
  p.q_stride_h = 96;
  EXPECT_EQ(nsa_sel_decode_supported(&p), NSA_SEL_ERR_UNSUPPORTED);
  EXPECT_EQ(nsa_sel_decode_cuda(&p, 0, nullptr), NSA_SEL_ERR_UNSUPPORTED);
  EXPECT_NE(std::string(nsa_sel_last_error()).find("d_k"), std::string::npos);
  p = pr.params(true);
  p.s = 2;
  p.q_stride_b = 2 * p.q_stride_s;
  EXPECT_EQ(nsa_sel_decode_cuda(&p, 0, nullptr), NSA_SEL_ERR_UNSUPPORTED);
}

// Small grid for compute-sanitizer (memcheck, racecheck, initcheck): the one-block-per-row path,
// the cluster split path, with 1 and 2 warp teams, odd sizes, NaN-free random data.
TEST(Sanitizer, SmallGrid) {
  REQUIRE_GPU();
  // (b, d, n), 2 rows per b: 1 and 5 split 16 and 8 ways, 1 team (n = 5 < 2 tiles per team); 16
  // with 9 ranges: 2 splits and 2 teams (instead of 4 splits); 50 rows of 32 KB tiles: unsplit, 2
  // teams; the same of 16 KB tiles with 16 ranges (of up to 80 tokens, so up to 20 tiles a row):
  // unsplit, 4 teams; 400: the rows fill the GPU, no split, 1 team; and 2 of 32 KB tiles with 16
  // ranges: 16 splits of 1-2 tiles each, the plan of the d128 B=1 target shape.
  for (const auto& [b, d, n] : {std::tuple<int64_t, int64_t, int64_t>{1, 64, 5},
                                {5, 64, 5},
                                {2, 128, 16},
                                {16, 64, 9},
                                {50, 128, 5},
                                {50, 64, 16},
                                {400, 64, 5}}) {
    Case c;
    c.b = b;
    c.d_k = c.d_v = d;
    c.g = 2;
    c.h = 6;
    c.s_kv = 333;
    c.n = n;
    c.kv_lens = true;
    Problem pr(c, 100 + b);
    pr.upload();
    expect_close(pr, pr.run_gpu(), pr.run_cpu());
  }
}

}  // namespace
