// What the CUDA decode kernel covers, decided from shapes, strides and pointers alone (no CUDA
// call, no tensor data), so that nsa_sel_decode_supported and the launcher agree by construction.
#pragma once

#include <cstdint>

#include "nsa_sel/sel_attention.h"

namespace nsa_sel {

// Ranges staged in shared memory per block (8 bytes each); more go to the reference.
constexpr int64_t kMaxRanges = 4096;
// Heads per group the kernel instantiates (m-tiles of 16 heads: 1, 2 or 4).
constexpr int64_t kMaxHeads = 64;

// True for the (d_k, d_v) pairs the kernel instantiates.
constexpr bool head_dims_supported(int64_t d_k, int64_t d_v) {
  return (d_k == 64 && d_v == 64) || (d_k == 128 && d_v == 128) || (d_k == 192 && d_v == 128) ||
         (d_k == 256 && d_v == 256);
}

// Number of 16-head m-tiles the kernel uses for h heads (1, 2 or 4).
constexpr int m_tiles_for_heads(int64_t h) { return h <= 16 ? 1 : (h <= 32 ? 2 : 4); }

// NSA_SEL_OK, or NSA_SEL_ERR_UNSUPPORTED with the reason recorded (nsa_sel_last_error), or the
// status of nsa_sel_validate. Assumes nothing about p beyond what nsa_sel_validate checks.
NsaSelStatus decode_supported(const NsaSelParams& p);

}  // namespace nsa_sel
