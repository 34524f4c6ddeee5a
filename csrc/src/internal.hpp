// Internal helpers shared by the core's translation units (not installed, not public).
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstring>

#include "nsa_sel/sel_attention.h"

namespace nsa_sel {

// Records a printf-style message as this thread's last error and returns `status`.
NsaSelStatus fail(NsaSelStatus status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// Clears this thread's last error and returns NSA_SEL_OK.
NsaSelStatus ok();

// Reads element i of an int32/int64 index tensor as int64.
inline int64_t load_index(const void* base, int32_t type, int64_t i) {
  return type == NSA_SEL_I64 ? static_cast<const int64_t*>(base)[i]
                             : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

// Host-side check of the kv_lens values: 0 <= kv_lens[i] <= s_kv for every i < b (reads the
// kv_lens tensor, so host pointers only; OK when kv_lens is NULL). Assumes nsa_sel_validate passed.
NsaSelStatus check_kv_lens_host(const NsaSelParams& p);

// Bit-exact host conversions between IEEE binary16 / bfloat16 (as raw bits) and float.
// Widening is exact; narrowing rounds to nearest, ties to even; NaN stays a (quiet) NaN.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);  // signed zero
  // Subnormal: value = mant * 2^-24; normalise into a float (always representable).
  int e = -1;
  do {
    mant <<= 1;
    ++e;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | static_cast<uint32_t>(127 - 15 - e) << 23 | ((mant & 0x3FFu) << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u | static_cast<uint16_t>((abs >> 13) & 0x1FFu);
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf (and inf itself)
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: value / 2^-24, rounded to nearest even. abs < 2^-14 here.
    if (abs < 0x33000000u) return sign;  // < 2^-25 rounds to zero (2^-25 itself ties to 0)
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24 for exp in [102, 112]
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even. A carry
  // out of the mantissa correctly bumps the exponent (up to inf, excluded above).
  uint32_t r = abs - 0x38000000u;  // exponent bias 127 -> 15
  r += 0xFFFu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace nsa_sel
