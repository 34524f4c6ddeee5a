// Kernel instantiations for (d_k, d_v) = (192, 128), f16 and bf16 (see sel_decode_launch.cuh).
#include "sel_decode_launch.cuh"

namespace nsa_sel {
NSA_SEL_INSTANTIATE_DIMS(192, 128)
}  // namespace nsa_sel
