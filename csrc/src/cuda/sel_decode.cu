// Launcher of the decode kernel: coverage check, compile-time dispatch, split planning, launch.
// No allocation, no host synchronisation, launch on the caller's stream: CUDA-graph capturable.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../dispatch.hpp"
#include "../internal.hpp"
#include "sel_decode_kernel.cuh"

namespace nsa_sel {
namespace {

constexpr int kMaxDevices = 64;
constexpr int kMaxClusterSplits = 8;  // portable cluster size

struct DeviceInfo {
  int sm_count = 0;
  int cc_major = 0;
  int max_smem_optin = 0;
};

// Device attributes, read once per device (attribute queries do not synchronise).
cudaError_t device_info(int device, DeviceInfo* out) {
  static DeviceInfo cache[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && ready[device].load(std::memory_order_acquire)) {
    *out = cache[device];
    return cudaSuccess;
  }
  DeviceInfo info;
  cudaError_t err = cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                 device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) {
    cache[device] = info;
    ready[device].store(true, std::memory_order_release);
  }
  *out = info;
  return cudaSuccess;
}

NsaSelStatus cuda_status(cudaError_t err, const char* what) {
  switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorStubLibrary:
    case cudaErrorSystemNotReady:
    case cudaErrorCompatNotSupportedOnDevice:
      return fail(NSA_SEL_ERR_NO_DEVICE, "%s: %s", what, cudaGetErrorString(err));
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return fail(NSA_SEL_ERR_CUDA_STICKY, "%s: %s (the CUDA context is no longer usable)", what,
                  cudaGetErrorString(err));
    default:
      return fail(NSA_SEL_ERR_CUDA, "%s: %s", what, cudaGetErrorString(err));
  }
}

// Splits per (b, g) row, from shapes and the device only (never from ranges contents): enough
// blocks to cover the SMs `blocks_per_sm` deep, at most one split per 64-token tile the row could
// hold, and only on GPUs with thread block clusters (the combine runs through distributed shared
// memory).
int plan_splits(const NsaSelParams& p, const DeviceInfo& dev, int blocks_per_sm) {
  if (dev.cc_major < 9) return 1;
  const int64_t rows = p.b * p.g;
  const int64_t slots = static_cast<int64_t>(dev.sm_count) * std::max(blocks_per_sm, 1);
  if (rows >= slots) return 1;
  const int64_t max_tokens = p.n * p.s_kv;  // < 2^31 (decode_supported)
  const int64_t max_tiles = std::max<int64_t>((max_tokens + 63) / 64, 1);
  int64_t want = (slots + rows - 1) / rows;
  want = std::min<int64_t>({want, kMaxClusterSplits, max_tiles});
  int splits = 1;
  while (splits * 2 <= want) splits *= 2;  // powers of two divide the cluster-friendly grid
  return splits;
}

template <typename T, int DK, int DV, int MT>
NsaSelStatus launch(const NsaSelParams& p, int device, const DeviceInfo& dev,
                    cudaStream_t stream) {
  using Tr = DecodeTraits<T, DK, DV, MT>;
  auto kernel = sel_decode_kernel<T, DK, DV, MT>;
  const int smem = Tr::smem_bytes(p.n);
  if (smem > dev.max_smem_optin)
    return fail(NSA_SEL_ERR_UNSUPPORTED, "n: %lld ranges need %d bytes of shared memory, the "
                "device allows %d", static_cast<long long>(p.n), smem, dev.max_smem_optin);

  // Raise the dynamic shared-memory limit once per device and size (idempotent, so a race
  // between threads only repeats the call).
  static std::atomic<int> smem_set[kMaxDevices];
  if (device < 0 || device >= kMaxDevices || smem_set[device].load() < smem) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cuda_status(err, "cudaFuncSetAttribute");
    if (device >= 0 && device < kMaxDevices) smem_set[device].store(smem);
  }

  // Blocks per SM that the shared memory allows (registers allow more for every instantiation).
  const int per_sm_smem = 228 * 1024;
  const int blocks_per_sm = std::max(1, std::min(per_sm_smem / (smem + 1024), 2048 / Tr::kThreads));
  const int splits = plan_splits(p, dev, blocks_per_sm);
  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in exp2 form
  const int64_t blocks = p.b * p.g * splits;

  if (splits == 1) {
    kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, smem, stream>>>(p, scale_log2, splits);
  } else {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(Tr::kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = splits;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, p, scale_log2, splits);
    if (err != cudaSuccess) return cuda_status(err, "cudaLaunchKernelEx");
  }
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
    default: return fail(NSA_SEL_ERR_UNSUPPORTED, "h: %lld heads not instantiated",
                         static_cast<long long>(p.h));
  }
}

template <typename T>
NsaSelStatus dispatch_dims(const NsaSelParams& p, int device, const DeviceInfo& dev,
                           cudaStream_t stream) {
  if (p.d_k == 64 && p.d_v == 64) return dispatch_heads<T, 64, 64>(p, device, dev, stream);
  if (p.d_k == 128 && p.d_v == 128) return dispatch_heads<T, 128, 128>(p, device, dev, stream);
  if (p.d_k == 192 && p.d_v == 128) return dispatch_heads<T, 192, 128>(p, device, dev, stream);
  if (p.d_k == 256 && p.d_v == 256) return dispatch_heads<T, 256, 256>(p, device, dev, stream);
  return fail(NSA_SEL_ERR_UNSUPPORTED, "(d_k, d_v) = (%lld, %lld) not instantiated",
              static_cast<long long>(p.d_k), static_cast<long long>(p.d_v));
}

}  // namespace
}  // namespace nsa_sel

extern "C" NsaSelStatus nsa_sel_decode_cuda(const NsaSelParams* p, int32_t device, void* stream) {
  using namespace nsa_sel;
  if (p == nullptr) return fail(NSA_SEL_ERR_INVALID_ARGUMENT, "p: expected non-NULL");
  const NsaSelStatus supported = decode_supported(*p);
  if (supported != NSA_SEL_OK) return supported;

  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_status(err, "cudaSetDevice");
  DeviceInfo dev;
  err = device_info(device, &dev);
  if (err != cudaSuccess) return cuda_status(err, "cudaDeviceGetAttribute");

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == NSA_SEL_BF16) return dispatch_dims<__nv_bfloat16>(*p, device, dev, s);
  return dispatch_dims<__half>(*p, device, dev, s);
}
