// Coverage of the CUDA decode kernel (see dispatch.hpp). Compiled with or without CUDA.
#include "dispatch.hpp"

#include <cinttypes>
#include <climits>

#include "internal.hpp"

namespace nsa_sel {
namespace {

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

NsaSelStatus decode_supported(const NsaSelParams& p) {
  const NsaSelStatus valid = nsa_sel_validate(&p);
  if (valid != NSA_SEL_OK) return valid;
#ifndef NSA_SEL_HAS_CUDA
  return fail(NSA_SEL_ERR_NOT_BUILT, "nsa_sel was built without CUDA (NSA_SEL_WITH_CUDA=OFF)");
#else
  const NsaSelStatus no = NSA_SEL_ERR_UNSUPPORTED;
  if (p.s != 1) return fail(no, "s: the decode kernel needs s == 1, got %" PRId64, p.s);
  if (p.dtype != NSA_SEL_F16 && p.dtype != NSA_SEL_BF16)
    return fail(no, "dtype: the kernel takes f16 or bf16, got %d", p.dtype);
  if (!head_dims_supported(p.d_k, p.d_v))
    return fail(no,
                "(d_k, d_v): the kernel instantiates (64,64), (128,128), (192,128), (256,256); "
                "got (%" PRId64 ", %" PRId64 ")",
                p.d_k, p.d_v);
  if (p.h > kMaxHeads)
    return fail(no, "h: the kernel takes at most %" PRId64 " heads per group, got %" PRId64,
                kMaxHeads, p.h);
  if (p.n > kMaxRanges)
    return fail(no, "n: the kernel stages at most %" PRId64 " ranges, got %" PRId64, kMaxRanges,
                p.n);
  if (p.s_kv >= INT32_MAX || (p.n > 0 && p.s_kv > INT32_MAX / p.n))
    return fail(
        no, "n * s_kv must stay below 2^31 (token counts are 32-bit), got %" PRId64 " * %" PRId64,
        p.n, p.s_kv);
  if (p.b * p.g > INT32_MAX / 16)
    return fail(no, "b * g: at most %d rows, got %" PRId64, INT32_MAX / 16, p.b * p.g);
  if (p.q_stride_d != 1 || p.k_stride_d != 1 || p.v_stride_d != 1 || p.o_stride_d != 1)
    return fail(no, "the last dimension of q, k, v and out must be contiguous (stride 1)");
  // 16-byte cp.async of K/V/Q rows: every row start must be 16-byte aligned.
  const bool rows16 = aligned(p.q, 16) && aligned(p.k, 16) && aligned(p.v, 16) &&
                      p.q_stride_b % 8 == 0 && p.q_stride_g % 8 == 0 && p.q_stride_h % 8 == 0 &&
                      p.k_stride_b % 8 == 0 && p.k_stride_g % 8 == 0 && p.k_stride_t % 8 == 0 &&
                      p.v_stride_b % 8 == 0 && p.v_stride_g % 8 == 0 && p.v_stride_t % 8 == 0;
  if (!rows16)
    return fail(no, "q, k, v rows must start on 16-byte boundaries (pointers and strides)");
  // Output is stored as pairs of elements (4 bytes).
  const bool out4 =
      aligned(p.out, 4) && p.o_stride_b % 2 == 0 && p.o_stride_g % 2 == 0 && p.o_stride_h % 2 == 0;
  if (!out4) return fail(no, "out rows must start on 4-byte boundaries (pointer and strides)");
  return ok();
#endif
}

}  // namespace nsa_sel

extern "C" {

int32_t nsa_sel_built_with_cuda(void) {
#ifdef NSA_SEL_HAS_CUDA
  return 1;
#else
  return 0;
#endif
}

NsaSelStatus nsa_sel_decode_supported(const NsaSelParams* p) {
  if (p == nullptr) return nsa_sel::fail(NSA_SEL_ERR_INVALID_ARGUMENT, "p: expected non-NULL");
  return nsa_sel::decode_supported(*p);
}

}  // extern "C"
