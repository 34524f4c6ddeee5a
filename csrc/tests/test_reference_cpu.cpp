// The C++ CPU reference (nsa_sel_reference_cpu) against hand-computed cases, SPEC.md's edge
// cases, layout equivalences, and a float64 naive oracle on random inputs of odd sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../src/internal.hpp"  // half/bf16 conversions under test
#include "nsa_sel/params.hpp"
#include "nsa_sel/sel_attention.h"

namespace {

using nsa_sel::SelShape;

// ---------------------------------------------------------------------------------------------
// Host buffers of any element type, addressed by element offset.

enum class Kind { F16, BF16, F32, I32, I64 };

Kind value_kind(int32_t dtype) {
  return dtype == NSA_SEL_F16 ? Kind::F16 : dtype == NSA_SEL_BF16 ? Kind::BF16 : Kind::F32;
}
Kind index_kind(int32_t type) { return type == NSA_SEL_I64 ? Kind::I64 : Kind::I32; }
size_t kind_size(Kind k) { return k == Kind::F16 || k == Kind::BF16 ? 2 : k == Kind::I64 ? 8 : 4; }

class Buf {
 public:
  Buf() = default;
  Buf(Kind kind, int64_t numel) : kind_(kind), bytes_(numel * kind_size(kind)) {}

  int64_t numel() const { return static_cast<int64_t>(bytes_.size() / kind_size(kind_)); }
  uint8_t* data() { return bytes_.data(); }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

  void set(int64_t i, double x) {
    switch (kind_) {
      case Kind::F16: put<uint16_t>(i, nsa_sel::float_to_half(static_cast<float>(x))); break;
      case Kind::BF16: put<uint16_t>(i, nsa_sel::float_to_bf16(static_cast<float>(x))); break;
      case Kind::F32: put<float>(i, static_cast<float>(x)); break;
      case Kind::I32: put<int32_t>(i, static_cast<int32_t>(x)); break;
      case Kind::I64: put<int64_t>(i, static_cast<int64_t>(x)); break;
    }
  }
  void set_index(int64_t i, int64_t x) {
    if (kind_ == Kind::I64)
      put<int64_t>(i, x);
    else
      put<int32_t>(i, static_cast<int32_t>(x));
  }
  double get(int64_t i) const {
    switch (kind_) {
      case Kind::F16: return nsa_sel::half_to_float(take<uint16_t>(i));
      case Kind::BF16: return nsa_sel::bf16_to_float(take<uint16_t>(i));
      case Kind::F32: return take<float>(i);
      case Kind::I32: return take<int32_t>(i);
      case Kind::I64: return static_cast<double>(take<int64_t>(i));
    }
    return 0;
  }
  void fill(double x) {
    for (int64_t i = 0; i < numel(); ++i) set(i, x);
  }
  // Copies element `from` of `src` (same kind) to element `to` of this buffer, bit for bit.
  void copy_elem(int64_t to, const Buf& src, int64_t from) {
    const size_t e = kind_size(kind_);
    std::memcpy(&bytes_[to * e], &src.bytes_[from * e], e);
  }

 private:
  template <typename T>
  void put(int64_t i, T x) {
    std::memcpy(&bytes_[i * sizeof(T)], &x, sizeof(T));
  }
  template <typename T>
  T take(int64_t i) const {
    T x;
    std::memcpy(&x, &bytes_[i * sizeof(T)], sizeof(T));
    return x;
  }

  Kind kind_ = Kind::F32;
  std::vector<uint8_t> bytes_;
};

// ---------------------------------------------------------------------------------------------
// One problem in contiguous layout.

struct Problem {
  SelShape x;
  int32_t dtype;
  int32_t index_type;
  int32_t kv_lens_type;
  Buf q, k, v, out, ranges, kv_lens;
  bool use_kv_lens = false;
  float scale;

  Problem(SelShape shape, int32_t dtype_, int32_t index_type_ = NSA_SEL_I32,
          int32_t kv_lens_type_ = NSA_SEL_I32)
      : x(shape),
        dtype(dtype_),
        index_type(index_type_),
        kv_lens_type(kv_lens_type_),
        q(value_kind(dtype_), nsa_sel::q_numel(shape)),
        k(value_kind(dtype_), nsa_sel::k_numel(shape)),
        v(value_kind(dtype_), nsa_sel::v_numel(shape)),
        out(value_kind(dtype_), nsa_sel::out_numel(shape)),
        ranges(index_kind(index_type_), nsa_sel::ranges_numel(shape)),
        kv_lens(index_kind(kv_lens_type_), shape.b),
        scale(static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.d_k)))) {
    out.fill(std::numeric_limits<double>::quiet_NaN());  // poison: every element must be written
  }

  int64_t qi(int64_t b, int64_t s, int64_t g, int64_t j, int64_t d) const {
    return (((b * x.s + s) * x.g + g) * x.h + j) * x.d_k + d;
  }
  int64_t ki(int64_t b, int64_t g, int64_t t, int64_t d) const {
    return ((b * x.g + g) * x.s_kv + t) * x.d_k + d;
  }
  int64_t vi(int64_t b, int64_t g, int64_t t, int64_t d) const {
    return ((b * x.g + g) * x.s_kv + t) * x.d_v + d;
  }
  int64_t oi(int64_t b, int64_t s, int64_t g, int64_t j, int64_t d) const {
    return (((b * x.s + s) * x.g + g) * x.h + j) * x.d_v + d;
  }
  int64_t ri(int64_t b, int64_t s, int64_t g, int64_t i, int64_t e) const {
    return (((b * x.s + s) * x.g + g) * x.n + i) * 2 + e;
  }

  void set_range(int64_t b, int64_t s, int64_t g, int64_t i, int64_t start, int64_t end) {
    ranges.set_index(ri(b, s, g, i, 0), start);
    ranges.set_index(ri(b, s, g, i, 1), end);
  }
  // The same list of ranges for every (b, s, g) row.
  void set_all_ranges(const std::vector<std::pair<int64_t, int64_t>>& rs) {
    for (int64_t b = 0; b < x.b; ++b)
      for (int64_t s = 0; s < x.s; ++s)
        for (int64_t g = 0; g < x.g; ++g)
          for (int64_t i = 0; i < x.n; ++i) set_range(b, s, g, i, rs[i].first, rs[i].second);
  }
  void set_kv_lens(const std::vector<int64_t>& lens) {
    use_kv_lens = true;
    for (int64_t b = 0; b < x.b; ++b) kv_lens.set_index(b, lens[b]);
  }
  void randomize(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    for (Buf* t : {&q, &k, &v}) {
      for (int64_t i = 0; i < t->numel(); ++i) t->set(i, normal(rng));
    }
  }

  NsaSelParams params() {
    NsaSelParams p = nsa_sel::contiguous_params(x, static_cast<NsaSelDtype>(dtype),
                                                static_cast<NsaSelIndexType>(index_type),
                                                static_cast<NsaSelIndexType>(kv_lens_type));
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.ranges = ranges.data();
    p.kv_lens = use_kv_lens ? kv_lens.data() : nullptr;
    p.scale = scale;
    return p;
  }

  void run() {
    NsaSelParams p = params();
    ASSERT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_OK) << nsa_sel_last_error();
    ASSERT_STREQ(nsa_sel_last_error(), "");
  }

  double o(int64_t b, int64_t s, int64_t g, int64_t j, int64_t d) const {
    return out.get(oi(b, s, g, j, d));
  }
};

// ---------------------------------------------------------------------------------------------
// The float64 naive oracle: gather the selected multiset, softmax in double. Contiguous only.

std::vector<double> oracle_f64(const Problem& P) {
  const SelShape& x = P.x;
  std::vector<double> out(nsa_sel::out_numel(x), 0.0);
  for (int64_t b = 0; b < x.b; ++b) {
    const int64_t kv_len = P.use_kv_lens ? static_cast<int64_t>(P.kv_lens.get(b)) : x.s_kv;
    for (int64_t s = 0; s < x.s; ++s) {
      const int64_t t = kv_len - x.s + s;
      const int64_t lim = std::min(t + 1, kv_len);
      for (int64_t g = 0; g < x.g; ++g) {
        std::vector<int64_t> idx;
        for (int64_t i = 0; i < x.n; ++i) {
          const int64_t start = static_cast<int64_t>(P.ranges.get(P.ri(b, s, g, i, 0)));
          const int64_t end = static_cast<int64_t>(P.ranges.get(P.ri(b, s, g, i, 1)));
          for (int64_t tok = std::max<int64_t>(start, 0); tok < std::min(end, lim); ++tok) {
            idx.push_back(tok);
          }
        }
        if (idx.empty()) continue;
        for (int64_t j = 0; j < x.h; ++j) {
          std::vector<double> score(idx.size());
          for (size_t i = 0; i < idx.size(); ++i) {
            double dot = 0;
            for (int64_t d = 0; d < x.d_k; ++d) {
              dot += P.q.get(P.qi(b, s, g, j, d)) * P.k.get(P.ki(b, g, idx[i], d));
            }
            score[i] = static_cast<double>(P.scale) * dot;
          }
          const double m = *std::max_element(score.begin(), score.end());
          double denom = 0;
          for (double& sc : score) denom += (sc = std::exp(sc - m));
          for (int64_t d = 0; d < x.d_v; ++d) {
            double acc = 0;
            for (size_t i = 0; i < idx.size(); ++i)
              acc += score[i] * P.v.get(P.vi(b, g, idx[i], d));
            out[P.oi(b, s, g, j, d)] = acc / denom;
          }
        }
      }
    }
  }
  return out;
}

// Largest |reference - oracle| relative to the output dtype's rounding: each element must be
// within abs_tol + rel_tol * |oracle|. Also checks the mean absolute error (SPEC's 1e-3 bar).
void expect_close_to_oracle(const Problem& P, double abs_tol, double rel_tol) {
  const std::vector<double> want = oracle_f64(P);
  double sum_err = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(want.size()); ++i) {
    const double got = P.out.get(i);
    ASSERT_TRUE(std::isfinite(got)) << "element " << i;
    const double err = std::fabs(got - want[i]);
    sum_err += err;
    if (err > abs_tol + rel_tol * std::fabs(want[i]) && bad++ < 5) {
      ADD_FAILURE() << "element " << i << ": got " << got << ", oracle " << want[i];
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LE(sum_err / static_cast<double>(want.size()), 1e-3);
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Hand-computed cases.

TEST(ReferenceCpu, TwoTokensHandComputed) {
  // One head, d_k = d_v = 1, scale 1. Scores 0 and ln 3 give weights 1/4 and 3/4:
  // out = 4 * 1/4 + 8 * 3/4 = 7.
  Problem P({1, 1, 1, 1, 1, 1, 2, 1}, NSA_SEL_F32);
  P.scale = 1.0f;
  P.q.set(0, 1.0);
  P.k.set(P.ki(0, 0, 0, 0), 0.0);
  P.k.set(P.ki(0, 0, 1, 0), std::log(3.0));
  P.v.set(P.vi(0, 0, 0, 0), 4.0);
  P.v.set(P.vi(0, 0, 1, 0), 8.0);
  P.set_all_ranges({{0, 2}});
  P.run();
  EXPECT_NEAR(P.o(0, 0, 0, 0, 0), 7.0, 1e-6);
}

TEST(ReferenceCpu, TwoHeadsTwoDimsHandComputed) {
  // d_k = 2, scale 1/sqrt(2) folded away by q = sqrt(2) * (a, b). Head 0 prefers token 1
  // (scores 0, ln 3 -> 1/4, 3/4), head 1 scores both tokens equally (-> 1/2, 1/2).
  Problem P({1, 1, 1, 2, 2, 2, 2, 1}, NSA_SEL_F32);
  P.scale = 1.0f;
  P.q.set(P.qi(0, 0, 0, 0, 0), 0.0);
  P.q.set(P.qi(0, 0, 0, 0, 1), std::log(3.0));
  P.q.set(P.qi(0, 0, 0, 1, 0), 1.0);
  P.q.set(P.qi(0, 0, 0, 1, 1), 0.0);
  P.k.set(P.ki(0, 0, 0, 0), 5.0);  // k0 = (5, 0), k1 = (5, 1)
  P.k.set(P.ki(0, 0, 0, 1), 0.0);
  P.k.set(P.ki(0, 0, 1, 0), 5.0);
  P.k.set(P.ki(0, 0, 1, 1), 1.0);
  P.v.set(P.vi(0, 0, 0, 0), 2.0);  // v0 = (2, -4), v1 = (6, 8)
  P.v.set(P.vi(0, 0, 0, 1), -4.0);
  P.v.set(P.vi(0, 0, 1, 0), 6.0);
  P.v.set(P.vi(0, 0, 1, 1), 8.0);
  P.set_all_ranges({{0, 2}});
  P.run();
  EXPECT_NEAR(P.o(0, 0, 0, 0, 0), 0.25 * 2 + 0.75 * 6, 1e-6);
  EXPECT_NEAR(P.o(0, 0, 0, 0, 1), 0.25 * -4 + 0.75 * 8, 1e-6);
  EXPECT_NEAR(P.o(0, 0, 0, 1, 0), 4.0, 1e-6);
  EXPECT_NEAR(P.o(0, 0, 0, 1, 1), 2.0, 1e-6);
}

class ReferenceCpuDtype : public ::testing::TestWithParam<int32_t> {};

TEST_P(ReferenceCpuDtype, SingleTokenReturnsItsValueExactly) {
  // One selected token: weight exp(0) / exp(0) = 1, so out is V of that token, bit for bit.
  Problem P({2, 1, 3, 4, 64, 32, 20, 1}, GetParam());
  P.randomize(1);
  P.set_all_ranges({{7, 8}});
  P.run();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t g = 0; g < 3; ++g)
      for (int64_t j = 0; j < 4; ++j)
        for (int64_t d = 0; d < 32; ++d) ASSERT_EQ(P.o(b, 0, g, j, d), P.v.get(P.vi(b, g, 7, d)));
}

TEST_P(ReferenceCpuDtype, UniformScoresGiveMeanOfV) {
  // q = 0 gives equal scores, so out is the plain mean of the selected V rows (exact here).
  Problem P({1, 1, 1, 3, 8, 2, 10, 2}, GetParam());
  P.randomize(2);
  P.q.fill(0.0);
  const double vals[4][2] = {{1, -8}, {2, 4}, {3, 0.5}, {6, 2}};
  const int64_t toks[4] = {1, 2, 6, 7};
  for (int i = 0; i < 4; ++i)
    for (int d = 0; d < 2; ++d) P.v.set(P.vi(0, 0, toks[i], d), vals[i][d]);
  P.set_all_ranges({{1, 3}, {6, 8}});
  P.run();
  for (int64_t j = 0; j < 3; ++j) {
    EXPECT_EQ(P.o(0, 0, 0, j, 0), 3.0);
    EXPECT_EQ(P.o(0, 0, 0, j, 1), -0.375);
  }
}

TEST_P(ReferenceCpuDtype, RandomAgainstFloat64Oracle) {
  const int32_t dtype = GetParam();
  // Output rounding of the dtype (half an ulp, relative) plus fp32 accumulation error.
  const double rel = dtype == NSA_SEL_F32 ? 1e-5 : dtype == NSA_SEL_F16 ? 1.0 / 1024 : 1.0 / 128;
  uint64_t seed = 100;
  for (int64_t s_kv : {1, 3, 63, 65, 1999}) {
    for (int32_t index_type : {NSA_SEL_I32, NSA_SEL_I64}) {
      SCOPED_TRACE("s_kv=" + std::to_string(s_kv) + " index_type=" + std::to_string(index_type));
      std::mt19937_64 rng(++seed);
      const int64_t s = 1 + static_cast<int64_t>(rng() % 3);
      const int64_t d_k = s_kv == 1999 ? 64 : 1 + static_cast<int64_t>(rng() % 70);
      const int64_t d_v = s_kv == 1999 ? 32 : 1 + static_cast<int64_t>(rng() % 70);
      Problem P({2, s, 2, 3, d_k, d_v, s_kv, 4}, dtype, index_type, index_type ^ 1);
      P.randomize(seed);
      // Ranges anywhere in [-8, s_kv + 8): empty, reversed, negative, overlapping, past the limit.
      std::uniform_int_distribution<int64_t> pos(-8, s_kv + 8);
      for (int64_t i = 0; i < P.ranges.numel(); ++i) P.ranges.set_index(i, pos(rng));
      std::uniform_int_distribution<int64_t> len(0, s_kv);
      P.set_kv_lens({s_kv, len(rng)});
      P.run();
      expect_close_to_oracle(P, 1e-5, rel);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, ReferenceCpuDtype,
                         ::testing::Values(NSA_SEL_F32, NSA_SEL_F16, NSA_SEL_BF16),
                         [](const ::testing::TestParamInfo<int32_t>& info) {
                           return std::string(info.param == NSA_SEL_F32   ? "f32"
                                              : info.param == NSA_SEL_F16 ? "f16"
                                                                          : "bf16");
                         });

// ---------------------------------------------------------------------------------------------
// Ranges: empty, clamped, limits, overlaps, order.

TEST(ReferenceCpu, EmptySelectionGivesExactZeros) {
  // s_kv = 10, decode: lim = 10. Every range is empty after clamping.
  Problem P({1, 1, 2, 2, 8, 8, 10, 4}, NSA_SEL_F16);
  P.randomize(3);
  P.set_all_ranges({{5, 5}, {6, 2}, {-7, -1}, {10, 30}});
  P.run();
  for (int64_t i = 0; i < P.out.numel(); ++i) {
    ASSERT_EQ(P.out.get(i), 0.0) << i;
    ASSERT_FALSE(std::signbit(P.out.get(i))) << i;
  }
}

TEST(ReferenceCpu, NoRangesAndEmptyCacheGiveZerosWithNullPointers) {
  for (const SelShape& x : {SelShape{2, 1, 1, 2, 4, 4, 5, 0}, SelShape{2, 1, 1, 2, 4, 4, 0, 2}}) {
    Problem P(x, NSA_SEL_BF16);
    NsaSelParams p = P.params();
    if (x.n == 0) p.ranges = nullptr;  // a tensor with no elements may have no data pointer
    if (x.s_kv == 0) p.k = p.v = nullptr;
    if (x.s_kv == 0) P.set_all_ranges({{0, 3}, {-1, 1}});
    ASSERT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_OK) << nsa_sel_last_error();
    for (int64_t i = 0; i < P.out.numel(); ++i) ASSERT_EQ(P.out.get(i), 0.0);
  }
}

// Runs `P` with `ranges` and `Q` with `same` and expects bit-identical outputs.
void expect_same_output(Problem P, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                        const std::vector<std::pair<int64_t, int64_t>>& same) {
  Problem Q = P;
  P.set_all_ranges(ranges);
  Q.x.n = static_cast<int64_t>(same.size());
  Q.ranges = Buf(index_kind(Q.index_type), nsa_sel::ranges_numel(Q.x));
  Q.set_all_ranges(same);
  P.run();
  Q.run();
  EXPECT_EQ(P.out.bytes(), Q.out.bytes());
}

TEST(ReferenceCpu, RangesAreClampedToTheCausalLimit) {
  // kv_len 9 of 12: lim = 9. Negative starts clamp to 0, ends past the limit clamp to it, a range
  // starting at or past the limit (or ending at or before 0) is empty.
  Problem P({1, 1, 1, 2, 16, 16, 12, 2}, NSA_SEL_F32);
  P.randomize(4);
  P.set_kv_lens({9});
  expect_same_output(P, {{-5, 3}, {7, 100}}, {{0, 3}, {7, 9}});
  expect_same_output(P, {{9, 12}, {0, 1}}, {{0, 1}});
  expect_same_output(P, {{-3, 0}, {4, 6}}, {{4, 6}});
  // No kv_lens: lim = s_kv = 12.
  Problem D({1, 1, 1, 2, 16, 16, 12, 2}, NSA_SEL_BF16);
  D.randomize(5);
  expect_same_output(D, {{12, 20}, {4, 6}}, {{4, 6}});
  expect_same_output(D, {{10, 1000}, {4, 2}}, {{10, 12}});
}

TEST(ReferenceCpu, RangeEndingExactlyAtTheLimitIncludesTheLastToken) {
  Problem P({1, 1, 1, 1, 4, 4, 10, 1}, NSA_SEL_F32);
  P.randomize(6);
  P.q.fill(0.0);  // uniform weights: out is the mean of V over tokens 8 and 9
  P.set_all_ranges({{8, 10}});
  P.run();
  for (int64_t d = 0; d < 4; ++d) {
    const double want = (P.v.get(P.vi(0, 0, 8, d)) + P.v.get(P.vi(0, 0, 9, d))) / 2;
    EXPECT_NEAR(P.o(0, 0, 0, 0, d), want, 1e-6);
  }
  expect_same_output(P, {{8, 10}}, {{8, 11}});
}

TEST(ReferenceCpu, OverlappingRangesCountATokenTwice) {
  // Tokens {2, 3} and {3, 4}: the multiset {2, 3, 3, 4}, so with uniform scores
  // out = (v2 + 2 v3 + v4) / 4.
  Problem P({1, 1, 1, 1, 4, 1, 8, 2}, NSA_SEL_F32);
  P.q.fill(0.0);
  P.k.fill(1.0);
  const double vals[] = {0, 0, 1, 2, 5, 0, 0, 0};
  for (int t = 0; t < 8; ++t) P.v.set(P.vi(0, 0, t, 0), vals[t]);
  P.set_all_ranges({{2, 4}, {3, 5}});
  P.run();
  EXPECT_EQ(P.o(0, 0, 0, 0, 0), (1 + 2 * 2 + 5) / 4.0);
}

TEST(ReferenceCpu, RangeOrderDoesNotChangeTheResultBeyondRounding) {
  Problem P({2, 1, 2, 4, 32, 32, 300, 5}, NSA_SEL_F32);
  P.randomize(7);
  std::vector<std::pair<int64_t, int64_t>> rs = {
      {0, 64}, {64, 128}, {200, 264}, {130, 131}, {280, 300}};
  P.set_all_ranges(rs);
  P.run();
  std::vector<double> first(P.out.numel());
  for (int64_t i = 0; i < P.out.numel(); ++i) first[i] = P.out.get(i);
  std::reverse(rs.begin(), rs.end());
  std::swap(rs[1], rs[3]);
  P.set_all_ranges(rs);
  P.run();
  for (int64_t i = 0; i < P.out.numel(); ++i) ASSERT_NEAR(P.out.get(i), first[i], 1e-6);
}

// ---------------------------------------------------------------------------------------------
// kv_lens, S > 1, index types.

TEST(ReferenceCpu, KvLensLimitEachSequence) {
  // Everything at or past kv_lens[b] is NaN: it must never be read.
  Problem P({3, 1, 2, 2, 8, 8, 20, 1}, NSA_SEL_BF16, NSA_SEL_I64, NSA_SEL_I32);
  P.randomize(8);
  const std::vector<int64_t> lens = {20, 7, 0};
  P.set_kv_lens(lens);
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t t = lens[b]; t < 20; ++t) {
        for (int64_t d = 0; d < 8; ++d) P.k.set(P.ki(b, g, t, d), kNaN);
        for (int64_t d = 0; d < 8; ++d) P.v.set(P.vi(b, g, t, d), kNaN);
      }
  P.set_all_ranges({{0, 20}});
  P.run();
  expect_close_to_oracle(P, 1e-5, 1.0 / 128);
  for (int64_t i = P.oi(2, 0, 0, 0, 0); i < P.out.numel(); ++i) ASSERT_EQ(P.out.get(i), 0.0);
}

TEST(ReferenceCpu, KvLensOutOfRangeIsInvalidArgument) {
  for (int64_t bad : {-1, 21}) {
    Problem P({2, 1, 1, 1, 4, 4, 20, 1}, NSA_SEL_F32, NSA_SEL_I32, NSA_SEL_I64);
    P.set_all_ranges({{0, 4}});
    P.set_kv_lens({3, bad});
    NsaSelParams p = P.params();
    EXPECT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_ERR_INVALID_ARGUMENT);
    const std::string msg = nsa_sel_last_error();
    EXPECT_NE(msg.find("kv_lens[1]"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
  }
}

TEST(ReferenceCpu, MultipleQueriesAreCausalFromTheNewestPosition) {
  // S = 3 queries of a 10-token sequence sit at positions 7, 8, 9; each sees keys up to its own.
  Problem P({1, 3, 1, 2, 16, 16, 10, 1}, NSA_SEL_F32);
  P.randomize(9);
  P.set_all_ranges({{0, 10}});
  P.run();
  expect_close_to_oracle(P, 1e-5, 1e-5);
  for (int64_t s = 0; s < 3; ++s) {
    // Query s alone as a decode step over the first 8 + s tokens: bit-identical.
    Problem D({1, 1, 1, 2, 16, 16, 10, 1}, NSA_SEL_F32);
    D.k = P.k;
    D.v = P.v;
    for (int64_t i = 0; i < D.q.numel(); ++i) D.q.copy_elem(i, P.q, P.qi(0, s, 0, 0, 0) + i);
    D.set_all_ranges({{0, 8 + s}});
    D.run();
    for (int64_t i = 0; i < D.out.numel(); ++i) {
      ASSERT_EQ(D.out.get(i), P.out.get(P.oi(0, s, 0, 0, 0) + i));
    }
  }
  // With kv_len 2 and S = 3, query 0 sits at position -1 and sees nothing.
  P.set_kv_lens({2});
  P.run();
  for (int64_t i = 0; i < P.oi(0, 1, 0, 0, 0); ++i) ASSERT_EQ(P.out.get(i), 0.0);
  expect_close_to_oracle(P, 1e-5, 1e-5);
}

TEST(ReferenceCpu, Int32AndInt64IndicesGiveIdenticalResults) {
  Problem A({2, 2, 2, 2, 8, 8, 50, 3}, NSA_SEL_F16, NSA_SEL_I32, NSA_SEL_I32);
  A.randomize(10);
  Problem B({2, 2, 2, 2, 8, 8, 50, 3}, NSA_SEL_F16, NSA_SEL_I64, NSA_SEL_I64);
  B.q = A.q;
  B.k = A.k;
  B.v = A.v;
  std::mt19937_64 rng(11);
  for (int64_t i = 0; i < A.ranges.numel(); ++i) {
    const int64_t r = static_cast<int64_t>(rng() % 60) - 5;
    A.ranges.set_index(i, r);
    B.ranges.set_index(i, r);
  }
  A.set_kv_lens({50, 31});
  B.set_kv_lens({50, 31});
  A.run();
  B.run();
  EXPECT_EQ(A.out.bytes(), B.out.bytes());
  // Int64 values beyond int32 are clamped like any other.
  B.set_all_ranges({{-(int64_t{1} << 40), 4}, {10, int64_t{1} << 40}, {int64_t{1} << 33, 3}});
  A.set_all_ranges({{0, 4}, {10, 50}, {5, 3}});
  A.run();
  B.run();
  EXPECT_EQ(A.out.bytes(), B.out.bytes());
}

// ---------------------------------------------------------------------------------------------
// Poison and determinism.

TEST(ReferenceCpu, NanInUnselectedRowsDoesNotLeak) {
  Problem clean({2, 1, 2, 4, 32, 16, 40, 2}, NSA_SEL_F16);
  clean.randomize(12);
  clean.set_all_ranges({{3, 9}, {30, 33}});
  Problem dirty = clean;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t t = 0; t < 40; ++t) {
        if ((t >= 3 && t < 9) || (t >= 30 && t < 33)) continue;
        for (int64_t d = 0; d < 32; ++d) dirty.k.set(dirty.ki(b, g, t, d), kNaN);
        for (int64_t d = 0; d < 16; ++d) dirty.v.set(dirty.vi(b, g, t, d), kNaN);
      }
  clean.run();
  dirty.run();
  EXPECT_EQ(clean.out.bytes(), dirty.out.bytes());
  for (int64_t i = 0; i < dirty.out.numel(); ++i) ASSERT_TRUE(std::isfinite(dirty.out.get(i)));
}

TEST(ReferenceCpu, NanInSelectedInputsPropagates) {
  Problem P({1, 1, 1, 2, 4, 4, 8, 1}, NSA_SEL_F32);
  P.randomize(13);
  P.set_all_ranges({{0, 8}});
  P.q.set(P.qi(0, 0, 0, 1, 2), kNaN);  // head 1 only
  P.run();
  for (int64_t d = 0; d < 4; ++d) {
    EXPECT_TRUE(std::isfinite(P.o(0, 0, 0, 0, d)));
    EXPECT_TRUE(std::isnan(P.o(0, 0, 0, 1, d)));
  }
}

TEST(ReferenceCpu, RepeatedRunsAreBitwiseIdentical) {
  Problem P({2, 2, 2, 3, 40, 24, 100, 3}, NSA_SEL_BF16);
  P.randomize(14);
  P.set_all_ranges({{0, 30}, {50, 90}, {95, 100}});
  P.run();
  const std::vector<uint8_t> first = P.out.bytes();
  P.run();
  EXPECT_EQ(P.out.bytes(), first);
}

// ---------------------------------------------------------------------------------------------
// Strided layouts: permuted, padded, non-contiguous last dim, negative strides.

// Strides for a tensor stored with its dims in `outer_to_inner` order, each extent padded by
// `pad`, the innermost stride `step`, and the dims in `negated` running backwards. `base` is the
// offset of element [0, ..., 0] in a buffer of `size` elements.
struct Layout {
  std::vector<int64_t> strides;
  int64_t base = 0;
  int64_t size = 0;
};

Layout make_layout(const std::vector<int64_t>& extents, const std::vector<int>& outer_to_inner,
                   int64_t pad, int64_t step, const std::vector<int>& negated) {
  Layout L;
  L.strides.assign(extents.size(), 0);
  int64_t stride = step;
  for (auto it = outer_to_inner.rbegin(); it != outer_to_inner.rend(); ++it) {
    L.strides[*it] = stride;
    stride *= extents[*it] + pad;
  }
  L.size = stride;
  for (int dim : negated) {
    L.base += L.strides[dim] * (extents[dim] - 1);
    L.strides[dim] = -L.strides[dim];
  }
  return L;
}

// Calls f(flat contiguous index, strided offset) for every element.
template <typename F>
void for_each_elem(const std::vector<int64_t>& extents, const Layout& L, F f) {
  std::vector<int64_t> idx(extents.size(), 0);
  int64_t total = 1;
  for (int64_t e : extents) total *= e;
  for (int64_t flat = 0; flat < total; ++flat) {
    int64_t rem = flat, off = L.base;
    for (int64_t d = static_cast<int64_t>(extents.size()) - 1; d >= 0; --d) {
      idx[d] = rem % extents[d];
      rem /= extents[d];
      off += idx[d] * L.strides[d];
    }
    f(flat, off);
  }
}

struct Strided {
  Buf buf;
  Layout L;
};

Strided restride(const Buf& src, Kind kind, const std::vector<int64_t>& extents, const Layout& L,
                 double fill) {
  Strided t{Buf(kind, L.size), L};
  t.buf.fill(fill);
  for_each_elem(extents, L, [&](int64_t flat, int64_t off) { t.buf.copy_elem(off, src, flat); });
  return t;
}

TEST(ReferenceCpu, StridedLayoutsEqualContiguous) {
  for (int32_t dtype : {NSA_SEL_F16, NSA_SEL_BF16, NSA_SEL_F32}) {
    SCOPED_TRACE("dtype=" + std::to_string(dtype));
    const SelShape x{2, 2, 3, 4, 24, 16, 70, 3};
    Problem P(x, dtype, NSA_SEL_I64, NSA_SEL_I32);
    P.randomize(15);
    std::mt19937_64 rng(16);
    for (int64_t i = 0; i < P.ranges.numel(); ++i)
      P.ranges.set_index(i, static_cast<int64_t>(rng() % 80) - 5);
    P.set_kv_lens({70, 45});
    P.run();

    const Kind vk = value_kind(dtype);
    const std::vector<int64_t> qe = {x.b, x.s, x.g, x.h, x.d_k};
    const std::vector<int64_t> ke = {x.b, x.g, x.s_kv, x.d_k};
    const std::vector<int64_t> ve = {x.b, x.g, x.s_kv, x.d_v};
    const std::vector<int64_t> oe = {x.b, x.s, x.g, x.h, x.d_v};
    const std::vector<int64_t> re = {x.b, x.s, x.g, x.n, 2};
    // Q: heads outermost, d strided by 2. K: a slice of a longer, padded cache [g, b, t, d].
    // V: tokens stored backwards. Out: permuted and padded (padding must stay untouched).
    // Ranges: start/end axis outermost. kv_lens: every third element.
    Strided q = restride(P.q, vk, qe, make_layout(qe, {3, 2, 0, 1, 4}, 1, 2, {}), kNaN);
    Strided k = restride(P.k, vk, ke, make_layout(ke, {1, 0, 2, 3}, 5, 1, {}), kNaN);
    Strided v = restride(P.v, vk, ve, make_layout(ve, {0, 2, 1, 3}, 0, 1, {2, 0}), kNaN);
    Strided r = restride(P.ranges, index_kind(P.index_type), re,
                         make_layout(re, {4, 2, 1, 0, 3}, 0, 1, {}), 0);
    Strided l = restride(P.kv_lens, index_kind(P.kv_lens_type), {x.b},
                         make_layout({x.b}, {0}, 0, 3, {}), 0);
    Strided o = restride(P.out, vk, oe, make_layout(oe, {2, 4, 0, 3, 1}, 1, 1, {3}), -7.0);
    o.buf.fill(-7.0);  // sentinel everywhere, output elements included

    NsaSelParams p = P.params();
    const int64_t e = static_cast<int64_t>(kind_size(vk));
    const int64_t ie = static_cast<int64_t>(kind_size(index_kind(P.index_type)));
    const int64_t le = static_cast<int64_t>(kind_size(index_kind(P.kv_lens_type)));
    p.q = q.buf.data() + q.L.base * e;
    p.k = k.buf.data() + k.L.base * e;
    p.v = v.buf.data() + v.L.base * e;
    p.out = o.buf.data() + o.L.base * e;
    p.ranges = r.buf.data() + r.L.base * ie;
    p.kv_lens = l.buf.data() + l.L.base * le;
    const auto& qs = q.L.strides;
    const auto& ks = k.L.strides;
    const auto& vs = v.L.strides;
    const auto& os = o.L.strides;
    const auto& rs = r.L.strides;
    p.q_stride_b = qs[0], p.q_stride_s = qs[1], p.q_stride_g = qs[2], p.q_stride_h = qs[3];
    p.q_stride_d = qs[4];
    p.k_stride_b = ks[0], p.k_stride_g = ks[1], p.k_stride_t = ks[2], p.k_stride_d = ks[3];
    p.v_stride_b = vs[0], p.v_stride_g = vs[1], p.v_stride_t = vs[2], p.v_stride_d = vs[3];
    p.o_stride_b = os[0], p.o_stride_s = os[1], p.o_stride_g = os[2], p.o_stride_h = os[3];
    p.o_stride_d = os[4];
    p.r_stride_b = rs[0], p.r_stride_s = rs[1], p.r_stride_g = rs[2], p.r_stride_n = rs[3];
    p.r_stride_e = rs[4];
    p.kv_lens_stride_b = l.L.strides[0];
    ASSERT_LT(p.v_stride_t, 0);
    ASSERT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_OK) << nsa_sel_last_error();

    std::vector<bool> is_out(o.L.size, false);
    for_each_elem(oe, o.L, [&](int64_t flat, int64_t off) {
      is_out[off] = true;
      ASSERT_EQ(std::memcmp(o.buf.data() + off * e, P.out.data() + flat * e, e), 0) << flat;
    });
    for (int64_t off = 0; off < o.L.size; ++off) {
      if (!is_out[off]) ASSERT_EQ(o.buf.get(off), -7.0) << "padding written at " << off;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16 conversions.

TEST(Conversion, HalfKnownValues) {
  using nsa_sel::float_to_half;
  using nsa_sel::half_to_float;
  const float two_m24 = std::ldexp(1.0f, -24), two_m25 = std::ldexp(1.0f, -25);
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65519.996f), 0x7BFF);
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);  // tie with 65536 goes to the even (inf)
  EXPECT_EQ(float_to_half(1e10f), 0x7C00);
  EXPECT_EQ(float_to_half(-INFINITY), 0xFC00);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(float_to_half(two_m24), 0x0001);                // smallest subnormal
  EXPECT_EQ(float_to_half(two_m25), 0x0000);                // tie -> even (0)
  EXPECT_EQ(float_to_half(std::nextafter(two_m25, 1.0f)), 0x0001);
  EXPECT_EQ(float_to_half(3 * two_m25), 0x0002);                       // tie between 1 and 2 -> 2
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14) - two_m25), 0x0400);   // tie 0x3FF/0x400
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3C01);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
  EXPECT_EQ(float_to_half(NAN) & 0x7E00, 0x7E00);  // quiet NaN
  EXPECT_EQ(half_to_float(0x0001), two_m24);
  EXPECT_EQ(half_to_float(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(half_to_float(0xFC00), -INFINITY);
}

TEST(Conversion, HalfRoundTripIsExactForEveryPattern) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = nsa_sel::half_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) << h;
      ASSERT_TRUE(std::isnan(nsa_sel::half_to_float(nsa_sel::float_to_half(f)))) << h;
      continue;
    }
    ASSERT_EQ(nsa_sel::float_to_half(f), h) << h;
    // Widening is exact: the value is mantissa * 2^exponent as the binary16 format defines.
    const int exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    const double want = exp == 0    ? std::ldexp(mant, -24)
                        : exp == 31 ? INFINITY
                                    : std::ldexp(1024 + mant, exp - 25);
    ASSERT_EQ(std::fabs(static_cast<double>(f)), want) << h;
  }
}

TEST(Conversion, HalfRoundsToNearestEvenOnRandomFloats) {
  // Independent check: the result is the nearest half, and on a tie its mantissa is even.
  std::mt19937 rng(17);
  for (int i = 0; i < 200000; ++i) {
    float f;
    const uint32_t bits = (rng() & 0x807FFFFFu) | ((100 + rng() % 44) << 23);  // |f| in 2^-27..2^16
    std::memcpy(&f, &bits, sizeof(f));
    const uint16_t h = nsa_sel::float_to_half(f);
    const double got = nsa_sel::half_to_float(h);
    if (std::isinf(got)) {
      ASSERT_GE(std::fabs(f), 65520.0f) << f;
      continue;
    }
    const double err = std::fabs(got - f);
    for (int delta : {-1, 1}) {
      const uint16_t n = static_cast<uint16_t>((h & 0x7FFF) + delta) | (h & 0x8000);
      if ((h & 0x7FFF) == 0 && delta < 0) continue;
      const double other = std::fabs(static_cast<double>(nsa_sel::half_to_float(n)) - f);
      ASSERT_LE(err, other) << f;
      if (err == other) ASSERT_EQ(h & 1, 0) << f;
    }
  }
}

TEST(Conversion, Bfloat16KnownValuesAndRoundTrip) {
  using nsa_sel::bf16_to_float;
  using nsa_sel::float_to_bf16;
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);      // tie -> even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);  // tie -> even
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3F81);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds to inf
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7F80);
  EXPECT_EQ(float_to_bf16(std::ldexp(1.0f, -133)), 0x0001);  // subnormal kept
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f)))) << h;
    } else {
      ASSERT_EQ(float_to_bf16(f), h) << h;
    }
  }
}

}  // namespace
