/*
 * nsa_sel: the selection-attention branch of Native Sparse Attention (decode).
 *
 * Public C API of the torch-free core. C and C++ callers (an inference engine, the Python ctypes
 * binding, the GoogleTest suites) all use this header; it includes no CUDA or torch header.
 *
 * The op (../../../SPEC.md in the shared folder is the full contract):
 *
 *   out[b,s,g,j] = softmax_i(scale * Q[b,s,g,j] . K[b,g,i]) @ V[b,g,i]
 *
 * over the multiset of tokens i selected by the n half-open ranges ranges[b,s,g,:] after each
 * range is clamped to [0, lim), lim = min(kv_len[b] - S + s + 1, kv_len[b]). An empty selection
 * gives exact zeros. All strides are in elements, not bytes.
 */
#ifndef NSA_SEL_SEL_ATTENTION_H_
#define NSA_SEL_SEL_ATTENTION_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever NsaSelParams or a function signature changes; the Python binding checks it. */
#define NSA_SEL_ABI_VERSION 1

typedef enum NsaSelDtype {
  NSA_SEL_F16 = 0,
  NSA_SEL_BF16 = 1,
  NSA_SEL_F32 = 2, /* CPU reference only */
} NsaSelDtype;

typedef enum NsaSelIndexType {
  NSA_SEL_I32 = 0,
  NSA_SEL_I64 = 1,
} NsaSelIndexType;

typedef enum NsaSelStatus {
  NSA_SEL_OK = 0,
  NSA_SEL_ERR_INVALID_ARGUMENT = 1, /* caller bug: shape, stride, pointer, enum, kv_lens value */
  NSA_SEL_ERR_UNSUPPORTED = 2,      /* valid, but not covered by the CUDA kernel: use reference */
  NSA_SEL_ERR_NO_DEVICE = 3,        /* no usable CUDA device or driver */
  NSA_SEL_ERR_CUDA = 4,             /* CUDA runtime error; the context is still usable */
  NSA_SEL_ERR_CUDA_STICKY = 5,      /* the context is poisoned (illegal address, ...): raise */
  NSA_SEL_ERR_NOT_BUILT = 6,        /* this library was built without CUDA */
} NsaSelStatus;

/* One call of the op. Shapes use the paper's letters; every stride is in elements. */
typedef struct NsaSelParams {
  const void* q;       /* [b, s, g, h, d_k]  dtype                                     */
  const void* k;       /* [b, g, s_kv, d_k]  dtype                                     */
  const void* v;       /* [b, g, s_kv, d_v]  dtype                                     */
  const void* ranges;  /* [b, s, g, n, 2]    index_type: [start, end) token ranges     */
  const void* kv_lens; /* [b]                kv_lens_type, or NULL: s_kv for every row */
  void* out;           /* [b, s, g, h, d_v]  dtype                                     */

  int64_t b;    /* batch (sequences)                       */
  int64_t s;    /* query tokens per sequence (1 at decode) */
  int64_t g;    /* KV groups                               */
  int64_t h;    /* query heads per group                   */
  int64_t d_k;  /* head dim of Q and K                     */
  int64_t d_v;  /* head dim of V and out                   */
  int64_t s_kv; /* KV cache length (allocated)             */
  int64_t n;    /* ranges per query row                    */

  int64_t q_stride_b, q_stride_s, q_stride_g, q_stride_h, q_stride_d;
  int64_t k_stride_b, k_stride_g, k_stride_t, k_stride_d; /* t: token (s_kv) axis */
  int64_t v_stride_b, v_stride_g, v_stride_t, v_stride_d;
  int64_t o_stride_b, o_stride_s, o_stride_g, o_stride_h, o_stride_d;
  int64_t r_stride_b, r_stride_s, r_stride_g, r_stride_n, r_stride_e; /* e: start/end axis */
  int64_t kv_lens_stride_b;

  float scale;          /* softmax scale; the caller resolves the default 1/sqrt(d_k) */
  int32_t dtype;        /* NsaSelDtype of q, k, v and out                             */
  int32_t index_type;   /* NsaSelIndexType of ranges                                  */
  int32_t kv_lens_type; /* NsaSelIndexType of kv_lens (ignored when kv_lens is NULL)  */
} NsaSelParams;

/* NSA_SEL_ABI_VERSION of the compiled library. */
int32_t nsa_sel_abi_version(void);

/* sizeof(NsaSelParams) of the compiled library (a second ABI check for bindings). */
int64_t nsa_sel_params_size(void);

/* Message of the last failing call on this thread ("" if none). Valid until the next call. */
const char* nsa_sel_last_error(void);

/* 1 if this library was built with the CUDA kernel, else 0. */
int32_t nsa_sel_built_with_cuda(void);

/* Shape, stride, pointer and enum checks; reads no tensor data. */
NsaSelStatus nsa_sel_validate(const NsaSelParams* p);

/* The C++ CPU reference (the oracle): any s, any strides, f16/bf16/f32, fp32 accumulation.
 * All pointers are host pointers. Also checks the values of kv_lens (0 <= kv_len <= s_kv). */
NsaSelStatus nsa_sel_reference_cpu(const NsaSelParams* p);

/* NSA_SEL_OK if nsa_sel_decode_cuda covers this configuration, NSA_SEL_ERR_UNSUPPORTED (with a
 * reason in nsa_sel_last_error) if the caller should use the reference instead, or the status of
 * nsa_sel_validate if the parameters are invalid. Reads no tensor data and calls no CUDA API. */
NsaSelStatus nsa_sel_decode_supported(const NsaSelParams* p);

/* Launches the decode kernel on `stream` (a cudaStream_t; NULL is the legacy default stream) of
 * CUDA device `device`. Device pointers. Asynchronous, no host synchronisation, no allocation:
 * CUDA-graph capturable. kv_lens values outside [0, s_kv] are clamped into it on the device
 * (memory safety); callers that need the error check them on the host first. The calling
 * thread's current device is the same after the call as before it. */
NsaSelStatus nsa_sel_decode_cuda(const NsaSelParams* p, int32_t device, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NSA_SEL_SEL_ATTENTION_H_ */
