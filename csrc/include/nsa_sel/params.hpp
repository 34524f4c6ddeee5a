// C++ conveniences for filling NsaSelParams (header-only; the C API is sel_attention.h).
//
//   NsaSelParams p = nsa_sel::contiguous_params({B, 1, G, H, 128, 128, S_kv, 16}, NSA_SEL_BF16);
//   p.q = q; p.k = k; p.v = v; p.ranges = ranges; p.out = out;  // device pointers
//   if (nsa_sel_decode_supported(&p) == NSA_SEL_OK) status = nsa_sel_decode_cuda(&p, dev, stream);
//
// For a slice of a larger KV cache [B, G, S_max, D], keep the contiguous fill and set
// k_stride_g = S_max * D, k_stride_b = G * S_max * D (and the same for v).
#ifndef NSA_SEL_PARAMS_HPP_
#define NSA_SEL_PARAMS_HPP_

#include <cmath>
#include <cstdint>

#include "nsa_sel/sel_attention.h"

namespace nsa_sel {

// Extents of one call, in the paper's letters (see NsaSelParams).
struct SelShape {
  int64_t b, s, g, h, d_k, d_v, s_kv, n;
};

// Sets every stride of `p` to the row-major (contiguous) layout of its extents.
inline void set_contiguous_strides(NsaSelParams& p) {
  p.q_stride_d = 1;
  p.q_stride_h = p.d_k;
  p.q_stride_g = p.h * p.d_k;
  p.q_stride_s = p.g * p.q_stride_g;
  p.q_stride_b = p.s * p.q_stride_s;

  p.k_stride_d = 1;
  p.k_stride_t = p.d_k;
  p.k_stride_g = p.s_kv * p.d_k;
  p.k_stride_b = p.g * p.k_stride_g;

  p.v_stride_d = 1;
  p.v_stride_t = p.d_v;
  p.v_stride_g = p.s_kv * p.d_v;
  p.v_stride_b = p.g * p.v_stride_g;

  p.o_stride_d = 1;
  p.o_stride_h = p.d_v;
  p.o_stride_g = p.h * p.d_v;
  p.o_stride_s = p.g * p.o_stride_g;
  p.o_stride_b = p.s * p.o_stride_s;

  p.r_stride_e = 1;
  p.r_stride_n = 2;
  p.r_stride_g = p.n * 2;
  p.r_stride_s = p.g * p.r_stride_g;
  p.r_stride_b = p.s * p.r_stride_s;

  p.kv_lens_stride_b = 1;
}

// NsaSelParams for contiguous tensors of `shape`: extents, strides, scale = 1/sqrt(d_k), types.
// Pointers are left NULL for the caller to set (kv_lens stays NULL: every row uses s_kv).
inline NsaSelParams contiguous_params(const SelShape& shape, NsaSelDtype dtype,
                                      NsaSelIndexType index_type = NSA_SEL_I32,
                                      NsaSelIndexType kv_lens_type = NSA_SEL_I32) {
  NsaSelParams p{};
  p.b = shape.b;
  p.s = shape.s;
  p.g = shape.g;
  p.h = shape.h;
  p.d_k = shape.d_k;
  p.d_v = shape.d_v;
  p.s_kv = shape.s_kv;
  p.n = shape.n;
  set_contiguous_strides(p);
  p.scale =
      shape.d_k > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.d_k))) : 1.0f;
  p.dtype = dtype;
  p.index_type = index_type;
  p.kv_lens_type = kv_lens_type;
  return p;
}

// Number of elements of each tensor of a contiguous call (for allocating buffers).
inline int64_t q_numel(const SelShape& x) { return x.b * x.s * x.g * x.h * x.d_k; }
inline int64_t k_numel(const SelShape& x) { return x.b * x.g * x.s_kv * x.d_k; }
inline int64_t v_numel(const SelShape& x) { return x.b * x.g * x.s_kv * x.d_v; }
inline int64_t out_numel(const SelShape& x) { return x.b * x.s * x.g * x.h * x.d_v; }
inline int64_t ranges_numel(const SelShape& x) { return x.b * x.s * x.g * x.n * 2; }

}  // namespace nsa_sel

#endif  // NSA_SEL_PARAMS_HPP_
