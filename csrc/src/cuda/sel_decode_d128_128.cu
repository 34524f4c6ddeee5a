// Kernel instantiations for (d_k, d_v) = (128, 128), f16 and bf16 (see sel_decode_launch.cuh).
#include "sel_decode_launch.cuh"

namespace nsa_sel {
NSA_SEL_INSTANTIATE_DIMS(128, 128)
}  // namespace nsa_sel
