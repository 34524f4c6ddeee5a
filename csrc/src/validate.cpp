// nsa_sel_validate: every check of NsaSelParams that reads no tensor data (pointers, extents,
// enums, scale, 64-bit offset range), shared by the CPU reference and the CUDA launcher. Each
// failure names the field, the expected and the actual value.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "internal.hpp"

namespace nsa_sel {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

NsaSelStatus invalid(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

NsaSelStatus invalid(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return fail(NSA_SEL_ERR_INVALID_ARGUMENT, "%s", buf);
}

struct Dim {
  int64_t extent;
  int64_t stride;
};

// True if every element offset sum_i idx_i * stride_i (0 <= idx_i < extent_i) of the tensor and
// its element count fit in int64, so all index arithmetic below (and in the kernel) is exact.
template <int N>
bool offsets_fit_int64(const Dim (&dims)[N]) {
  uint64_t span = 0;  // sum of |stride| * (extent - 1): bounds |offset| for every element
  int64_t count = 1;  // number of elements
  for (const Dim& d : dims) {
    const uint64_t mag =
        d.stride < 0 ? 0 - static_cast<uint64_t>(d.stride) : static_cast<uint64_t>(d.stride);
    uint64_t term;
    if (__builtin_mul_overflow(mag, static_cast<uint64_t>(d.extent - 1), &term)) return false;
    if (__builtin_add_overflow(span, term, &span)) return false;
    if (__builtin_mul_overflow(count, d.extent, &count)) return false;
  }
  return span <= static_cast<uint64_t>(kInt64Max);
}

NsaSelStatus check_pointer(const char* name, const void* ptr, bool required) {
  if (required && ptr == nullptr) return invalid("%s: expected a non-NULL pointer, got NULL", name);
  return NSA_SEL_OK;
}

NsaSelStatus check_at_least(const char* name, int64_t value, int64_t min) {
  if (value < min) {
    return invalid("%s: expected >= %" PRId64 ", got %" PRId64, name, min, value);
  }
  return NSA_SEL_OK;
}

NsaSelStatus check_index_type(const char* name, int32_t type) {
  if (type != NSA_SEL_I32 && type != NSA_SEL_I64) {
    return invalid("%s: expected NSA_SEL_I32 (0) or NSA_SEL_I64 (1), got %d", name, type);
  }
  return NSA_SEL_OK;
}

}  // namespace

NsaSelStatus check_kv_lens_host(const NsaSelParams& p) {
  if (p.kv_lens == nullptr) return NSA_SEL_OK;
  for (int64_t i = 0; i < p.b; ++i) {
    const int64_t len = load_index(p.kv_lens, p.kv_lens_type, i * p.kv_lens_stride_b);
    if (len < 0 || len > p.s_kv) {
      return fail(NSA_SEL_ERR_INVALID_ARGUMENT,
                  "kv_lens[%" PRId64 "]: expected 0 <= kv_lens[%" PRId64 "] <= s_kv = %" PRId64
                  ", got %" PRId64,
                  i, i, p.s_kv, len);
    }
  }
  return NSA_SEL_OK;
}

}  // namespace nsa_sel

extern "C" NsaSelStatus nsa_sel_validate(const NsaSelParams* p) {
  using namespace nsa_sel;
  if (p == nullptr) return invalid("params: expected a non-NULL NsaSelParams*, got NULL");

#define NSA_SEL_CHECK(expr)                    \
  do {                                         \
    const NsaSelStatus status_ = (expr);       \
    if (status_ != NSA_SEL_OK) return status_; \
  } while (0)

  // Extents. s_kv = 0 (empty cache) and n = 0 (no ranges) are legal and give zero rows.
  NSA_SEL_CHECK(check_at_least("b", p->b, 1));
  NSA_SEL_CHECK(check_at_least("s", p->s, 1));
  NSA_SEL_CHECK(check_at_least("g", p->g, 1));
  NSA_SEL_CHECK(check_at_least("h", p->h, 1));
  NSA_SEL_CHECK(check_at_least("d_k", p->d_k, 1));
  NSA_SEL_CHECK(check_at_least("d_v", p->d_v, 1));
  NSA_SEL_CHECK(check_at_least("s_kv", p->s_kv, 0));
  NSA_SEL_CHECK(check_at_least("n", p->n, 0));

  // Pointers. A tensor with no elements may have a NULL data pointer (as torch gives for an
  // empty tensor), so K/V need one only when s_kv > 0 and ranges only when n > 0.
  NSA_SEL_CHECK(check_pointer("q", p->q, true));
  NSA_SEL_CHECK(check_pointer("k", p->k, p->s_kv > 0));
  NSA_SEL_CHECK(check_pointer("v", p->v, p->s_kv > 0));
  NSA_SEL_CHECK(check_pointer("ranges", p->ranges, p->n > 0));
  NSA_SEL_CHECK(check_pointer("out", p->out, true));

  // Enums.
  if (p->dtype != NSA_SEL_F16 && p->dtype != NSA_SEL_BF16 && p->dtype != NSA_SEL_F32) {
    return invalid("dtype: expected NSA_SEL_F16 (0), NSA_SEL_BF16 (1) or NSA_SEL_F32 (2), got %d",
                   p->dtype);
  }
  NSA_SEL_CHECK(check_index_type("index_type", p->index_type));
  if (p->kv_lens != nullptr) NSA_SEL_CHECK(check_index_type("kv_lens_type", p->kv_lens_type));

  if (!std::isfinite(p->scale)) {
    return invalid("scale: expected a finite value, got %g", static_cast<double>(p->scale));
  }

  // Strides may be any int64 (zero, negative, permuted); only the offset range must fit int64.
  const Dim q_dims[] = {{p->b, p->q_stride_b},
                        {p->s, p->q_stride_s},
                        {p->g, p->q_stride_g},
                        {p->h, p->q_stride_h},
                        {p->d_k, p->q_stride_d}};
  const Dim k_dims[] = {{p->b, p->k_stride_b},
                        {p->g, p->k_stride_g},
                        {p->s_kv, p->k_stride_t},
                        {p->d_k, p->k_stride_d}};
  const Dim v_dims[] = {{p->b, p->v_stride_b},
                        {p->g, p->v_stride_g},
                        {p->s_kv, p->v_stride_t},
                        {p->d_v, p->v_stride_d}};
  const Dim o_dims[] = {{p->b, p->o_stride_b},
                        {p->s, p->o_stride_s},
                        {p->g, p->o_stride_g},
                        {p->h, p->o_stride_h},
                        {p->d_v, p->o_stride_d}};
  const Dim r_dims[] = {{p->b, p->r_stride_b},
                        {p->s, p->r_stride_s},
                        {p->g, p->r_stride_g},
                        {p->n, p->r_stride_n},
                        {2, p->r_stride_e}};
  const Dim l_dims[] = {{p->b, p->kv_lens_stride_b}};
  auto overflow = [](const char* name) {
    return invalid(
        "%s: expected element offsets and count that fit in int64, got a shape and "
        "strides that overflow int64",
        name);
  };
  if (!offsets_fit_int64(q_dims)) return overflow("q");
  if (p->s_kv > 0 && !offsets_fit_int64(k_dims)) return overflow("k");
  if (p->s_kv > 0 && !offsets_fit_int64(v_dims)) return overflow("v");
  if (!offsets_fit_int64(o_dims)) return overflow("out");
  if (p->n > 0 && !offsets_fit_int64(r_dims)) return overflow("ranges");
  if (p->kv_lens != nullptr && !offsets_fit_int64(l_dims)) return overflow("kv_lens");
#undef NSA_SEL_CHECK

  return ok();
}
