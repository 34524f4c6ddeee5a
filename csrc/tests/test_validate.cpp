// nsa_sel_validate: every caller bug gives NSA_SEL_ERR_INVALID_ARGUMENT with a message naming the
// field, the expected and the actual value; every legal corner passes. Also the ABI queries and
// the no-CUDA stub.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "nsa_sel/params.hpp"
#include "nsa_sel/sel_attention.h"

namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

// A valid decode call. validate reads no tensor data, so the pointers only need to be non-NULL.
NsaSelParams valid_params() {
  static char dummy[16];
  NsaSelParams p = nsa_sel::contiguous_params({2, 1, 4, 16, 128, 128, 1000, 16}, NSA_SEL_BF16);
  p.q = p.k = p.v = p.ranges = dummy;
  p.out = dummy;
  return p;
}

struct BadCase {
  const char* name;
  std::function<void(NsaSelParams&)> mutate;
  std::vector<std::string> message_parts;  // each must appear in nsa_sel_last_error()
};

std::ostream& operator<<(std::ostream& os, const BadCase& c) { return os << c.name; }

class ValidateRejects : public ::testing::TestWithParam<BadCase> {};

TEST_P(ValidateRejects, WithInvalidArgumentNamingTheField) {
  NsaSelParams p = valid_params();
  GetParam().mutate(p);
  EXPECT_EQ(nsa_sel_validate(&p), NSA_SEL_ERR_INVALID_ARGUMENT);
  const std::string msg = nsa_sel_last_error();
  for (const std::string& part : GetParam().message_parts) {
    EXPECT_NE(msg.find(part), std::string::npos)
        << "message: \"" << msg << "\" lacks \"" << part << "\"";
  }
}

const BadCase kBadCases[] = {
    {"b_zero", [](NsaSelParams& p) { p.b = 0; }, {"b: expected >= 1, got 0"}},
    {"s_zero", [](NsaSelParams& p) { p.s = 0; }, {"s: expected >= 1, got 0"}},
    {"g_negative", [](NsaSelParams& p) { p.g = -3; }, {"g: expected >= 1, got -3"}},
    {"h_zero", [](NsaSelParams& p) { p.h = 0; }, {"h: expected >= 1, got 0"}},
    {"d_k_zero", [](NsaSelParams& p) { p.d_k = 0; }, {"d_k: expected >= 1, got 0"}},
    {"d_v_zero", [](NsaSelParams& p) { p.d_v = 0; }, {"d_v: expected >= 1, got 0"}},
    {"s_kv_negative", [](NsaSelParams& p) { p.s_kv = -1; }, {"s_kv: expected >= 0, got -1"}},
    {"n_negative", [](NsaSelParams& p) { p.n = -2; }, {"n: expected >= 0, got -2"}},
    {"q_null", [](NsaSelParams& p) { p.q = nullptr; }, {"q:", "non-NULL", "got NULL"}},
    {"k_null", [](NsaSelParams& p) { p.k = nullptr; }, {"k:", "non-NULL", "got NULL"}},
    {"v_null", [](NsaSelParams& p) { p.v = nullptr; }, {"v:", "non-NULL", "got NULL"}},
    {"ranges_null", [](NsaSelParams& p) { p.ranges = nullptr; }, {"ranges:", "got NULL"}},
    {"out_null", [](NsaSelParams& p) { p.out = nullptr; }, {"out:", "got NULL"}},
    {"dtype_out_of_range",
     [](NsaSelParams& p) { p.dtype = 3; },
     {"dtype:", "NSA_SEL_F16", "got 3"}},
    {"dtype_negative", [](NsaSelParams& p) { p.dtype = -1; }, {"dtype:", "got -1"}},
    {"index_type",
     [](NsaSelParams& p) { p.index_type = 2; },
     {"index_type:", "NSA_SEL_I32", "NSA_SEL_I64", "got 2"}},
    {"kv_lens_type",
     [](NsaSelParams& p) {
       p.kv_lens = p.q;
       p.kv_lens_type = 7;
     },
     {"kv_lens_type:", "got 7"}},
    {"scale_nan", [](NsaSelParams& p) { p.scale = NAN; }, {"scale:", "finite", "nan"}},
    {"scale_inf", [](NsaSelParams& p) { p.scale = INFINITY; }, {"scale:", "finite", "inf"}},
    {"k_offsets_overflow", [](NsaSelParams& p) { p.k_stride_t = kMax / 4; }, {"k:", "int64"}},
    {"v_stride_min", [](NsaSelParams& p) { p.v_stride_d = kMin; }, {"v:", "int64"}},
    {"q_offsets_overflow", [](NsaSelParams& p) { p.q_stride_h = -(kMax / 8); }, {"q:", "int64"}},
    {"out_offsets_overflow", [](NsaSelParams& p) { p.o_stride_b = kMax; }, {"out:", "int64"}},
    {"ranges_offsets_overflow",
     [](NsaSelParams& p) { p.r_stride_e = kMin + 1; },
     {"ranges:", "int64"}},
    {"kv_lens_offsets_overflow",
     [](NsaSelParams& p) {
       p.kv_lens = p.q;
       p.b = 3;
       p.kv_lens_stride_b = kMax / 2 + 1;
     },
     {"kv_lens:", "int64"}},
    {"element_count_overflow",
     [](NsaSelParams& p) {
       p.b = int64_t{1} << 32;
       p.h = int64_t{1} << 32;
       p.q_stride_b = p.q_stride_s = p.q_stride_g = p.q_stride_h = 0;
     },
     {"q:", "int64"}},
};

INSTANTIATE_TEST_SUITE_P(CallerBugs, ValidateRejects, ::testing::ValuesIn(kBadCases),
                         [](const ::testing::TestParamInfo<BadCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(Validate, NullParamsIsInvalidArgument) {
  EXPECT_EQ(nsa_sel_validate(nullptr), NSA_SEL_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(nsa_sel_last_error()).find("params"), std::string::npos);
  EXPECT_EQ(nsa_sel_reference_cpu(nullptr), NSA_SEL_ERR_INVALID_ARGUMENT);
}

TEST(Validate, AcceptsEveryLegalCorner) {
  const std::vector<std::function<void(NsaSelParams&)>> legal = {
      [](NsaSelParams&) {},
      [](NsaSelParams& p) { p.dtype = NSA_SEL_F16; },
      [](NsaSelParams& p) { p.dtype = NSA_SEL_F32; },
      [](NsaSelParams& p) { p.index_type = NSA_SEL_I64; },
      [](NsaSelParams& p) { p.s = 7; },  // S > 1 is valid input (the reference computes it)
      [](NsaSelParams& p) { p.kv_lens_type = 99; },  // ignored while kv_lens is NULL
      [](NsaSelParams& p) {
        p.kv_lens = p.q;
        p.kv_lens_type = NSA_SEL_I64;
      },
      [](NsaSelParams& p) {  // empty cache: K/V may have no data pointer
        p.s_kv = 0;
        p.k = p.v = nullptr;
      },
      [](NsaSelParams& p) {  // no ranges: the ranges tensor may have no data pointer
        p.n = 0;
        p.ranges = nullptr;
      },
      [](NsaSelParams& p) {  // broadcast (0) and reversed (negative) strides
        p.q_stride_s = 0;
        p.k_stride_t = -p.k_stride_t;
        p.v_stride_d = -1;
        p.r_stride_g = 0;
        p.o_stride_h = -p.o_stride_h;
      },
      [](NsaSelParams& p) { p.scale = -0.5f; },
      [](NsaSelParams& p) {  // large but representable offsets
        p.k_stride_b = int64_t{1} << 40;
        p.b = 1000;
      },
  };
  for (size_t i = 0; i < legal.size(); ++i) {
    NsaSelParams p = valid_params();
    legal[i](p);
    EXPECT_EQ(nsa_sel_validate(&p), NSA_SEL_OK) << "case " << i << ": " << nsa_sel_last_error();
    EXPECT_STREQ(nsa_sel_last_error(), "") << "case " << i;
  }
}

TEST(Validate, ReferenceRejectsWhatValidateRejects) {
  NsaSelParams p = valid_params();
  p.h = 0;
  EXPECT_EQ(nsa_sel_reference_cpu(&p), NSA_SEL_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(nsa_sel_last_error(), "h: expected >= 1, got 0");
}

TEST(Abi, VersionAndParamsSizeMatchTheHeader) {
  EXPECT_EQ(nsa_sel_abi_version(), NSA_SEL_ABI_VERSION);
  EXPECT_EQ(nsa_sel_params_size(), static_cast<int64_t>(sizeof(NsaSelParams)));
}

TEST(CudaStub, DecodeWithoutCudaReportsNotBuilt) {
  if (nsa_sel_built_with_cuda()) GTEST_SKIP() << "library built with CUDA";
  NsaSelParams p = valid_params();
  EXPECT_EQ(nsa_sel_decode_cuda(&p, 0, nullptr), NSA_SEL_ERR_NOT_BUILT);
  EXPECT_NE(std::string(nsa_sel_last_error()).find("without CUDA"), std::string::npos);
}

}  // namespace
