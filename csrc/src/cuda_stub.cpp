// nsa_sel_decode_cuda for a library built without CUDA (NSA_SEL_WITH_CUDA=OFF): every call
// reports NSA_SEL_ERR_NOT_BUILT, so callers fall back to the reference (or raise in strict mode).
#include "internal.hpp"

extern "C" NsaSelStatus nsa_sel_decode_cuda(const NsaSelParams* /*p*/, int32_t /*device*/,
                                            void* /*stream*/) {
  return nsa_sel::fail(
      NSA_SEL_ERR_NOT_BUILT,
      "nsa_sel_decode_cuda: this libnsa_sel was built without CUDA "
      "(NSA_SEL_WITH_CUDA=OFF); rebuild with nvcc available, or use the reference");
}
