// Launch of one kernel instantiation, and the per-head-count dispatch. Included by one .cu file
// per (d_k, d_v) pair (sel_decode_d*.cu), so the instantiations compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "../dispatch.hpp"
#include "../internal.hpp"
#include "plan.hpp"
#include "sel_decode_kernel.cuh"

namespace nsa_sel {

constexpr int kMaxDevices = 64;

// Maps a CUDA error to the library's status (no device / sticky / other) with a message.
NsaSelStatus cuda_status(cudaError_t err, const char* what);

// Tensor maps of K and V for the kernel's tensor copies (sel_decode.cu); false where there are
// none (before sm_90, no driver entry point, a layout the encoder refuses, or the debug knob):
// the kernel then reads every tile by cp.async.
bool make_kv_maps(const NsaSelParams& p, const DeviceInfo& dev, CUtensorMap* tk, CUtensorMap* tv);

// Tuning builds (NSA_SEL_TRACE): this launch's block records in the trace ring; null otherwise.
unsigned long long* trace_records();

// Per kernel and device: the dynamic shared-memory limit set so far, and the cluster occupancy
// answers of clusters_fit ((smem << 32 | clusters + 1) per split count, 0: empty).
struct KernelCache {
  std::atomic<int> smem_set[kMaxDevices];
  std::atomic<uint64_t> clusters[kMaxDevices][4];
  std::atomic<bool> non_portable[kMaxDevices];  // clusters of more than 8 blocks allowed
};

// One cached occupancy answer: (smem << 32 | answer + 1), 0 while empty. An entry answers for
// the shared-memory size it was asked with only.
inline bool cached_answer(const std::atomic<uint64_t>& entry, int smem, int* answer) {
  const uint64_t e = entry.load(std::memory_order_relaxed);
  if (e == 0 || static_cast<int>(e >> 32) != smem) return false;
  *answer = static_cast<int>(e & 0xffffffffu) - 1;
  return true;
}
inline void store_answer(std::atomic<uint64_t>& entry, int smem, int answer) {
  entry.store(static_cast<uint64_t>(smem) << 32 | static_cast<uint32_t>(answer + 1),
              std::memory_order_relaxed);
}

// Raises the kernel's dynamic shared-memory limit to smem once per device and size (idempotent,
// so a race between threads only repeats the call).
template <typename Kernel>
NsaSelStatus allow_smem(Kernel kernel, KernelCache& cache, int device, int smem) {
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && cache.smem_set[device].load(std::memory_order_relaxed) >= smem) return ok();
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return cuda_status(err, "cudaFuncSetAttribute");
  if (cached) cache.smem_set[device].store(smem, std::memory_order_relaxed);
  return ok();
}

// Clusters of more than 8 blocks (the portable size) need the kernel's opt-in, set once per
// kernel and device; false where the device refuses it.
template <typename Kernel>
bool allow_big_clusters(Kernel kernel, KernelCache& kc, int device) {
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && kc.non_portable[device].load(std::memory_order_relaxed)) return true;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (cached) kc.non_portable[device].store(true, std::memory_order_relaxed);
  return true;
}

// Whether `rows` clusters of `splits` blocks (`threads` threads, `smem` bytes of dynamic shared
// memory each) can all be resident at once (cudaOccupancyMaxActiveClusters; the kernel's dynamic
// shared-memory limit must already allow smem). Cached per kernel, device and split count for
// the last smem size asked, so a steady shape costs one atomic load. A failed query answers no.
// (Clusters of more than 8 blocks: see allow_big_clusters; where refused, they do not fit.)
template <typename Kernel>
bool clusters_fit(Kernel kernel, KernelCache& kc, int device, int splits, int smem, int threads,
                  int64_t rows) {
  const int slot = splits == 2 ? 0 : splits == 4 ? 1 : splits == 8 ? 2 : 3;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (splits > kPortableCluster && !allow_big_clusters(kernel, kc, device)) return false;
  int clusters = 0;
  if (cached && cached_answer(kc.clusters[device][slot], smem, &clusters)) return rows <= clusters;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(splits));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = splits;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query is not an error of this call: plan without it
    return false;
  }
  if (cached) store_answer(kc.clusters[device][slot], smem, clusters);
  return rows <= clusters;
}

// Resident blocks per SM of `kernel` with `threads` threads and `smem` bytes of dynamic shared
// memory (the kernel's limit must already allow smem), cached per device and stage count for the
// last smem size asked; 0 when the query fails (the caller then keeps its plan).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, std::atomic<uint64_t> (&cache)[kMaxDevices][8], int device,
                  int stages, int threads, int smem) {
  const bool cached = device >= 0 && device < kMaxDevices && stages >= 0 && stages < 8;
  int nb = 0;
  if (cached && cached_answer(cache[device][stages], smem, &nb)) return nb;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query is not an error of this call: plan without it
    return 0;
  }
  if (cached) store_answer(cache[device][stages], smem, nb);
  return nb;
}

template <typename T, int DK, int DV, int MT>
NsaSelStatus launch(const NsaSelParams& p, int device, const DeviceInfo& dev, cudaStream_t stream) {
  using Tr = DecodeTraits<T, DK, DV, MT>;
  // The one-team kernel and, where a block can hold more teams, the two-team kernel and (16 KB
  // tiles) the four-team kernel. Where a count is not instantiated its name stands for a smaller
  // one, which the plan never asks for (teams <= Tr::kMaxTeams).
  constexpr int kTeams2 = Tr::kMaxTeams >= 2 ? 2 : 1;
  constexpr int kTeams4 = Tr::kMaxTeams >= 4 ? 4 : kTeams2;
  auto kernel1 = sel_decode_kernel<T, DK, DV, MT, 1>;
  auto kernel2 = sel_decode_kernel<T, DK, DV, MT, kTeams2>;
  auto kernel4 = sel_decode_kernel<T, DK, DV, MT, kTeams4>;
  // The split K/V kernel (one team, one m-tile; for several m-tiles the name stands for kernel1).
  auto kernel1s = sel_decode_kernel<T, DK, DV, MT, 1, MT == 1>;
  // The one-team kernel with the early first-tile issue (one m-tile; else kernel1's name).
  auto kernel1e = sel_decode_kernel<T, DK, DV, MT, 1, false, MT == 1>;
  // The one-, two- and four-team kernels without the tensor-copy path (plan_tma_kernel).
  auto kernel1n = sel_decode_kernel<T, DK, DV, MT, 1, false, false, false>;
  auto kernel2n = sel_decode_kernel<T, DK, DV, MT, kTeams2, false, false, false>;
  auto kernel4n = sel_decode_kernel<T, DK, DV, MT, kTeams4, false, false, false>;
  static KernelCache cache1, cache2, cache4, cache1s, cache1e, cache1n, cache2n, cache4n;
  bool kv_split = false;  // one team, one m-tile: the split K/V kernel (kernel1s below)

  const int splits1 = plan_splits(p, dev, Tr::kTileBytes, Tr::kMaxTeams);  // with one team
  int splits = splits1;
  int teams = plan_teams(p, dev, splits, Tr::kTileBytes, Tr::kMaxTeams);
  int stages = plan_stages(p, dev, splits, teams, Tr::kTileBytes, Tr::kStages);
  auto smem_now = [&] { return Tr::smem_bytes(p.n, stages, splits, teams); };
  auto one_team = [&] {
    teams = 1;
    splits = splits1;
    stages = plan_stages(p, dev, splits, teams, Tr::kTileBytes, Tr::kStages);
  };
  // Shrinks the plan into the device's shared memory: the receive area of the split
  // combine must fit, else one block per row; then fewer stages (a deep or forced pipeline with
  // many ranges), down to 2.
  auto fit = [&]() -> NsaSelStatus {
    if (splits > 1 && smem_now() > dev.max_smem_optin) splits = 1;
    while (stages > 2 && smem_now() > dev.max_smem_optin) --stages;
    if (smem_now() > dev.max_smem_optin)
      return fail(NSA_SEL_ERR_UNSUPPORTED,
                  "n: %lld ranges need %d bytes of shared memory, the device allows %d",
                  static_cast<long long>(p.n), smem_now(), dev.max_smem_optin);
    return ok();
  };
  // Each team needs its own Q, stages and token buffers: where four teams do not fit (many
  // ranges, or forced stages) two are tried, and where two do not fit one is left.
  if (teams == 4 && smem_now() > dev.max_smem_optin) {
    teams = 2;
    stages = plan_stages(p, dev, splits, teams, Tr::kTileBytes, Tr::kStages);
  }
  if (teams > 1 && smem_now() > dev.max_smem_optin) one_team();
  NsaSelStatus st = fit();
  if (st != NSA_SEL_OK) return st;

  const int64_t rows = p.b * p.g;
  if (teams > 1) {
    // The kernel of `teams` teams may take this shared memory; and where rows are split, all the
    // clusters fit at once: blocks of several teams take an SM each, and a cluster needs
    // `splits` free SMs of one GPC. Where they would not all be resident, some would wait for a
    // second wave (measured: m125 B=16, 4-block clusters of two teams, 13.7 us against 9.6), so
    // keep one team.
    auto resident = [&](auto kernel, KernelCache& cache) {
      st = allow_smem(kernel, cache, device, smem_now());
      return st == NSA_SEL_OK &&
             (splits == 1 || clusters_fit(kernel, cache, device, splits, smem_now(),
                                          Tr::kThreads * teams, rows));
    };
    const bool fits = teams == 4 ? resident(kernel4, cache4) : resident(kernel2, cache2);
    if (st != NSA_SEL_OK) return st;
    if (!fits) {
      one_team();
      st = fit();
      if (st != NSA_SEL_OK) return st;
    }
  }
  if (teams == 1) {
    st = allow_smem(kernel1, cache1, device, smem_now());
    if (st != NSA_SEL_OK) return st;
    // A cluster of 16 blocks needs 16 free SMs of one GPC: where the rows' clusters would not
    // all be resident at once (or the device allows no clusters that large), 8 splits.
    if (splits > kPortableCluster &&
        !clusters_fit(kernel1, cache1, device, splits, smem_now(), Tr::kThreads, rows)) {
      splits = kPortableCluster;
      stages = plan_stages(p, dev, splits, teams, Tr::kTileBytes, Tr::kStages);
      st = fit();
      if (st != NSA_SEL_OK) return st;
      st = allow_smem(kernel1, cache1, device, smem_now());
      if (st != NSA_SEL_OK) return st;
    }
    // One pipeline stage where the rows would come in waves and one stage fits more blocks per
    // SM, with at least as many tiles in flight per SM: a block then loads a tile, computes it,
    // loads the next, and the other blocks of its SM keep the memory busy in between (fla's
    // Triton kernel at decode works this way: one 36 KB buffer, 4 programs per SM). A block of
    // s stages keeps s - 1 tiles in flight, one of 1 stage one tile while it waits. Measured on
    // the H200 (NOTES.md v13, cold graph us, stage forced): d128 B=128 70.9 -> 68.2 (4 blocks
    // per SM x 1 tile against 2 x 2: one wave instead of two), nsa27b B=128 85.2 -> 83.3 (4 x 1
    // against 2 x 1), seed D=128 L=512 N=1024 69.6 -> 67.1 (4 x 1 against 3 x 1); lost where the
    // tiles in flight fall, seed D=64 L=512 N=1024 37.9 -> 41.3 (5 x 1 against 4 x 2), and where
    // the rows fit at once, d128 B=64 38.1 -> 45.2, so neither takes it. Measured for h <= 16
    // (one m-tile) and rows of 8 tiles or more (the NSA selection's n blocks of 64 tokens; a
    // single range: its length bound) only, so only there: with a few tiles a row, one stage
    // would serialise a block's loads that two stages put in flight together.
    // One stage runs the split K/V kernel (a block's loads of the next tile's K overlap its PV,
    // those of the tile's V its QK^T), so its occupancy is asked of that kernel.
    if constexpr (MT == 1) {
      // Per stage count: kernel1 is asked at 2+ stages, kernel1s at 1, so one table serves both.
      static std::atomic<uint64_t> occupancy[kMaxDevices][8];
      if (splits == 1 && stages >= 2 && expected_tiles(p) >= 8 && !stages_forced()) {
        const int threads = Tr::kThreads;
        const int now = blocks_per_sm(kernel1, occupancy, device, stages, threads, smem_now());
        if (now > 0 && rows > static_cast<int64_t>(now) * dev.sm_count) {
          const int smem1 = Tr::smem_bytes(p.n, 1, 1, 1);
          st = allow_smem(kernel1s, cache1s, device, smem1);
          if (st != NSA_SEL_OK) return st;
          const int one = blocks_per_sm(kernel1s, occupancy, device, 1, threads, smem1);
          if (one > now && one >= now * (stages - 1)) stages = 1;
        }
      }
      kv_split = plan_kv_split(stages);
      if (kv_split) {
        st = allow_smem(kernel1s, cache1s, device, smem_now());
        if (st != NSA_SEL_OK) return st;
      }
    }
  }
  const int smem = smem_now();

  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in exp2 form

  const int64_t blocks = rows * splits;
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
  const int pdl_lead = plan_pdl_lead();
  // Tensor maps only for a kernel with the tensor-copy path. The early kernel needs them (the
  // read ahead itself does not; its rule was measured with them only), so where they cannot be
  // made the plan falls back to the plain kernel, with or without the path by the same rule.
  const bool early_wanted = MT == 1 && teams == 1 && !kv_split && stages >= 2 &&
                            plan_early_issue(p, dev, blocks, stages);
  CUtensorMap tmap_k{}, tmap_v{};
  int tma_on = plan_tma_kernel(splits, kv_split, early_wanted) &&
                       make_kv_maps(p, dev, &tmap_k, &tmap_v)
                   ? 1
                   : 0;
  const bool early = early_wanted && tma_on != 0;
  if (early && early_recheck_forced()) tma_on |= 2;
  const bool with_tma = plan_tma_kernel(splits, kv_split, early);
  auto kernel = teams == 4 ? (with_tma ? kernel4 : kernel4n)
                : teams == 2 ? (with_tma ? kernel2 : kernel2n)
                : kv_split   ? kernel1s
                : early      ? kernel1e
                : with_tma   ? kernel1
                             : kernel1n;
  KernelCache& kc = teams == 4 ? (with_tma ? cache4 : cache4n)
                    : teams == 2 ? (with_tma ? cache2 : cache2n)
                    : kv_split   ? cache1s
                    : early      ? cache1e
                    : with_tma   ? cache1
                                 : cache1n;
  // (The plans above sized shared memory and asked occupancy of the kernels with the path. The
  // kernels without it have the same layout but their own register counts, some higher (ptxas,
  // one team: d64 112 against 96, d192 164 against 156), so the one-stage rule's blocks-per-SM
  // figure can be one above what such a kernel gets; NOTES.md v25. Its opt-in is cached.)
  if (early || !with_tma) {
    st = allow_smem(kernel, kc, device, smem);
    if (st != NSA_SEL_OK) return st;
  }
  report_plan(p, splits, teams, stages, kv_split, smem, tma_on != 0, early);
  auto launch_with = [&](auto kernel) {
    return cudaLaunchKernelEx(&cfg, kernel, p, tmap_k, tmap_v, tma_on, scale_log2, splits, stages,
                              pdl_lead, trace);
  };
  // (The plans above asked clusters_fit of the kernel they launch where the cluster is past the
  // portable size; a forced plan may not have. The opt-in is idempotent and cached.)
  if (splits > kPortableCluster && !allow_big_clusters(kernel, kc, device))
    return fail(NSA_SEL_ERR_UNSUPPORTED, "splits: clusters of %d blocks refused by the device",
                splits);
  const cudaError_t launch_err = launch_with(kernel);
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
#define NSA_SEL_DECLARE_DIMS(DK, DV)                                                            \
  extern template NsaSelStatus dispatch_heads<__half, DK, DV>(const NsaSelParams&, int,         \
                                                              const DeviceInfo&, cudaStream_t); \
  extern template NsaSelStatus dispatch_heads<__nv_bfloat16, DK, DV>(                           \
      const NsaSelParams&, int, const DeviceInfo&, cudaStream_t);
#define NSA_SEL_INSTANTIATE_DIMS(DK, DV)                                                 \
  template NsaSelStatus dispatch_heads<__half, DK, DV>(const NsaSelParams&, int,         \
                                                       const DeviceInfo&, cudaStream_t); \
  template NsaSelStatus dispatch_heads<__nv_bfloat16, DK, DV>(const NsaSelParams&, int,  \
                                                              const DeviceInfo&, cudaStream_t);

NSA_SEL_DECLARE_DIMS(64, 64)
NSA_SEL_DECLARE_DIMS(128, 128)
NSA_SEL_DECLARE_DIMS(192, 128)
NSA_SEL_DECLARE_DIMS(256, 256)

}  // namespace nsa_sel
