// Launch of one kernel instantiation, and the per-head-count dispatch. Included by one .cu file
// per (d_k, d_v) pair (sel_decode_d*.cu), so the instantiations compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "../dispatch.hpp"
#include "../internal.hpp"
#include "sel_decode_kernel.cuh"

namespace nsa_sel {

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sm_count = 0;
  int cc_major = 0;
  int max_smem_optin = 0;
};

// Maps a CUDA error to the library's status (no device / sticky / other) with a message.
NsaSelStatus cuda_status(cudaError_t err, const char* what);

// Splits per (b, g) row, pipeline stages per team and warp teams per block (see sel_decode.cu).
int plan_splits(const NsaSelParams& p, const DeviceInfo& dev, int tile_bytes);
int plan_stages(const NsaSelParams& p, const DeviceInfo& dev, int splits, int tile_bytes,
                int max_stages);
int plan_teams(const NsaSelParams& p, const DeviceInfo& dev, int splits, int max_teams);

// Tuning builds (NSA_SEL_TRACE): this launch's block records in the trace ring; null otherwise.
unsigned long long* trace_records();

template <typename T, int DK, int DV, int MT>
NsaSelStatus launch(const NsaSelParams& p, int device, const DeviceInfo& dev,
                    cudaStream_t stream) {
  using Tr = DecodeTraits<T, DK, DV, MT>;
  auto kernel = sel_decode_kernel<T, DK, DV, MT>;

  int splits = plan_splits(p, dev, Tr::kTileBytes);
  const int stages = plan_stages(p, dev, splits, Tr::kTileBytes, Tr::kStages);
  // The receive area of the split combine must fit too; otherwise one block per row.
  if (splits > 1 && Tr::smem_bytes(p.n, stages, splits, 1) > dev.max_smem_optin) splits = 1;
  // A second team needs its own Q, stages and token buffers; it is dropped where they do not fit.
  int teams = plan_teams(p, dev, splits, Tr::kMaxTeams);
  if (teams > 1 && Tr::smem_bytes(p.n, stages, splits, teams) > dev.max_smem_optin) teams = 1;
  const int smem = Tr::smem_bytes(p.n, stages, splits, teams);
  if (smem > dev.max_smem_optin)
    return fail(NSA_SEL_ERR_UNSUPPORTED,
                "n: %lld ranges need %d bytes of shared memory, the device allows %d",
                static_cast<long long>(p.n), smem, dev.max_smem_optin);

  // Raise the dynamic shared-memory limit once per device and size (idempotent, so a race
  // between threads only repeats the call).
  static std::atomic<int> smem_set[kMaxDevices];
  const bool cached = device >= 0 && device < kMaxDevices;
  if (!cached || smem_set[device].load(std::memory_order_relaxed) < smem) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cuda_status(err, "cudaFuncSetAttribute");
    if (cached) smem_set[device].store(smem, std::memory_order_relaxed);
  }

  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in exp2 form

  const int64_t blocks = p.b * p.g * splits;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(Tr::kThreads * teams);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n_attr = 0;
  if (dev.cc_major >= 9) {
    // Overlap this launch with the tail of the previous kernel (the kernel waits for it before
    // reading anything: griddepcontrol.wait).
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
  }
  if (splits > 1) {
    attr[n_attr].id = cudaLaunchAttributeClusterDimension;
    attr[n_attr].val.clusterDim.x = splits;  // the splits of one row form one cluster
    attr[n_attr].val.clusterDim.y = 1;
    attr[n_attr].val.clusterDim.z = 1;
    ++n_attr;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n_attr;
  unsigned long long* trace = trace_records();
  const cudaError_t launch_err =
      cudaLaunchKernelEx(&cfg, kernel, p, scale_log2, splits, stages, teams, trace);
  if (launch_err != cudaSuccess) return cuda_status(launch_err, "cudaLaunchKernelEx");
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_status(err, "sel_decode_kernel launch");
  return ok();
}

template <typename T, int DK, int DV>
NsaSelStatus dispatch_heads(const NsaSelParams& p, int device, const DeviceInfo& dev,
                            cudaStream_t stream) {
  switch (m_tiles_for_heads(p.h)) {
    case 1: return launch<T, DK, DV, 1>(p, device, dev, stream);
    case 2: return launch<T, DK, DV, 2>(p, device, dev, stream);
    case 4: return launch<T, DK, DV, 4>(p, device, dev, stream);
    default:
      return fail(NSA_SEL_ERR_UNSUPPORTED, "h: %lld heads not instantiated",
                  static_cast<long long>(p.h));
  }
}

// One explicit instantiation per (d_k, d_v) pair and dtype lives in sel_decode_d*.cu.
#define NSA_SEL_DECLARE_DIMS(DK, DV)                                                          \
  extern template NsaSelStatus dispatch_heads<__half, DK, DV>(const NsaSelParams&, int,       \
                                                              const DeviceInfo&, cudaStream_t); \
  extern template NsaSelStatus dispatch_heads<__nv_bfloat16, DK, DV>(                         \
      const NsaSelParams&, int, const DeviceInfo&, cudaStream_t);
#define NSA_SEL_INSTANTIATE_DIMS(DK, DV)                                                \
  template NsaSelStatus dispatch_heads<__half, DK, DV>(const NsaSelParams&, int,        \
                                                       const DeviceInfo&, cudaStream_t); \
  template NsaSelStatus dispatch_heads<__nv_bfloat16, DK, DV>(                          \
      const NsaSelParams&, int, const DeviceInfo&, cudaStream_t);

NSA_SEL_DECLARE_DIMS(64, 64)
NSA_SEL_DECLARE_DIMS(128, 128)
NSA_SEL_DECLARE_DIMS(192, 128)
NSA_SEL_DECLARE_DIMS(256, 256)

}  // namespace nsa_sel
