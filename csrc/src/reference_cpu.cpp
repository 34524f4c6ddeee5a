// nsa_sel_reference_cpu: the C++ oracle of SPEC.md's semantics, written for obviousness rather
// than speed. Any s, any strides, f16/bf16/f32 storage, fp32 arithmetic, two-pass
// (max-subtracted) softmax. Only the K/V rows of the selected tokens are ever read.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "internal.hpp"

namespace nsa_sel {
namespace {

float load(const void* base, int32_t dtype, int64_t off) {
  switch (dtype) {
    case NSA_SEL_F16: return half_to_float(static_cast<const uint16_t*>(base)[off]);
    case NSA_SEL_BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
    default: return static_cast<const float*>(base)[off];
  }
}

void store(void* base, int32_t dtype, int64_t off, float x) {
  switch (dtype) {
    case NSA_SEL_F16: static_cast<uint16_t*>(base)[off] = float_to_half(x); break;
    case NSA_SEL_BF16: static_cast<uint16_t*>(base)[off] = float_to_bf16(x); break;
    default: static_cast<float*>(base)[off] = x;
  }
}

// One query row (b, s, g): all h heads over the selected multiset of tokens.
class RowReference {
 public:
  explicit RowReference(const NsaSelParams& p) : p_(p), q_(p.h * p.d_k), acc_(p.d_v) {}

  void run(int64_t b, int64_t s, int64_t g) {
    const NsaSelParams& p = p_;
    const int64_t kv_len =
        p.kv_lens ? load_index(p.kv_lens, p.kv_lens_type, b * p.kv_lens_stride_b) : p.s_kv;
    // The s queries are the newest s tokens of the sequence: query s sits at position t and may
    // see keys 0..t, never past the valid cache (t < 0 when s exceeds kv_len: nothing visible).
    const int64_t t = kv_len - p.s + s;
    const int64_t lim = std::min(t + 1, kv_len);

    // Clamp each range to [max(start, 0), min(end, lim)); empty ones contribute nothing.
    // Overlaps are kept: a token counts once per range that covers it.
    tokens_.clear();
    const int64_t r_row = b * p.r_stride_b + s * p.r_stride_s + g * p.r_stride_g;
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t r_off = r_row + i * p.r_stride_n;
      const int64_t start = std::max<int64_t>(load_index(p.ranges, p.index_type, r_off), 0);
      const int64_t end = std::min(load_index(p.ranges, p.index_type, r_off + p.r_stride_e), lim);
      for (int64_t tok = start; tok < end; ++tok) tokens_.push_back(tok);
    }
    const int64_t n_sel = static_cast<int64_t>(tokens_.size());

    const int64_t q_row = b * p.q_stride_b + s * p.q_stride_s + g * p.q_stride_g;
    const int64_t o_row = b * p.o_stride_b + s * p.o_stride_s + g * p.o_stride_g;
    if (n_sel == 0) {  // empty selection: exact zeros, not 0/0
      for (int64_t j = 0; j < p.h; ++j) {
        for (int64_t d = 0; d < p.d_v; ++d) {
          store(p.out, p.dtype, o_row + j * p.o_stride_h + d * p.o_stride_d, 0.0f);
        }
      }
      return;
    }

    for (int64_t j = 0; j < p.h; ++j) {
      for (int64_t d = 0; d < p.d_k; ++d) {
        q_[j * p.d_k + d] = load(p.q, p.dtype, q_row + j * p.q_stride_h + d * p.q_stride_d);
      }
    }

    // Pass 1: scores[i * h + j] = scale * q_j . k_i (fp32), each K row read once for all heads.
    scores_.assign(n_sel * p.h, 0.0f);
    const int64_t k_base = b * p.k_stride_b + g * p.k_stride_g;
    for (int64_t i = 0; i < n_sel; ++i) {
      const int64_t k_row = k_base + tokens_[i] * p.k_stride_t;
      for (int64_t d = 0; d < p.d_k; ++d) {
        const float kd = load(p.k, p.dtype, k_row + d * p.k_stride_d);
        for (int64_t j = 0; j < p.h; ++j) scores_[i * p.h + j] += q_[j * p.d_k + d] * kd;
      }
      for (int64_t j = 0; j < p.h; ++j) scores_[i * p.h + j] *= p.scale;
    }

    // Pass 2, per head: softmax with the max subtracted, then the weighted sum of V rows.
    // A NaN score never wins the max (the comparison is false) but still poisons its exp and
    // hence the row, as IEEE arithmetic would.
    const int64_t v_base = b * p.v_stride_b + g * p.v_stride_g;
    for (int64_t j = 0; j < p.h; ++j) {
      float m = -INFINITY;
      for (int64_t i = 0; i < n_sel; ++i) m = std::max(m, scores_[i * p.h + j]);
      float denom = 0.0f;
      std::fill(acc_.begin(), acc_.end(), 0.0f);
      for (int64_t i = 0; i < n_sel; ++i) {
        const float w = std::exp(scores_[i * p.h + j] - m);
        denom += w;
        const int64_t v_row = v_base + tokens_[i] * p.v_stride_t;
        for (int64_t d = 0; d < p.d_v; ++d)
          acc_[d] += w * load(p.v, p.dtype, v_row + d * p.v_stride_d);
      }
      const int64_t o_head = o_row + j * p.o_stride_h;
      for (int64_t d = 0; d < p.d_v; ++d) {
        store(p.out, p.dtype, o_head + d * p.o_stride_d, acc_[d] / denom);
      }
    }
  }

 private:
  const NsaSelParams& p_;
  std::vector<int64_t> tokens_;  // the selected multiset, in range order
  std::vector<float> q_;         // [h, d_k]
  std::vector<float> scores_;    // [n_sel, h]
  std::vector<float> acc_;       // [d_v]
};

}  // namespace
}  // namespace nsa_sel

extern "C" NsaSelStatus nsa_sel_reference_cpu(const NsaSelParams* p) {
  using namespace nsa_sel;
  NsaSelStatus status = nsa_sel_validate(p);
  if (status != NSA_SEL_OK) return status;
  status = check_kv_lens_host(*p);
  if (status != NSA_SEL_OK) return status;

  RowReference row(*p);
  for (int64_t b = 0; b < p->b; ++b) {
    for (int64_t s = 0; s < p->s; ++s) {
      for (int64_t g = 0; g < p->g; ++g) row.run(b, s, g);
    }
  }
  return ok();
}
