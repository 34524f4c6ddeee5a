// Entry point of the decode kernel: coverage check, device query, dtype and head-dim dispatch,
// split planning. No allocation, no host synchronisation, launch on the caller's stream:
// CUDA-graph capturable.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <set>
#include <string>

#include "sel_decode_launch.cuh"

namespace nsa_sel {
namespace {

// Device attributes, read once per device (attribute queries do not synchronise).
cudaError_t device_info(int device, DeviceInfo* out) {
  static DeviceInfo cache[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && ready[device].load(std::memory_order_acquire)) {
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
  if (cached) {
    cache[device] = info;
    ready[device].store(true, std::memory_order_release);
  }
  *out = info;
  return cudaSuccess;
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

#ifdef NSA_SEL_TRACE
// A ring of kTraceLaunches launches x kTraceMaxBlocks block records, allocated (and zeroed) at
// the first launch, which must therefore not be under graph capture. Tuning builds only.
namespace {
constexpr int kTraceLaunches = 64;
unsigned long long* g_trace = nullptr;
std::atomic<long long> g_trace_seq{0};
}  // namespace

unsigned long long* trace_records() {
  constexpr size_t kBytes =
      sizeof(unsigned long long) * kTraceLaunches * kTraceMaxBlocks * kTraceWords;
  if (g_trace == nullptr) {
    if (cudaMalloc(&g_trace, kBytes) != cudaSuccess ||
        cudaMemset(g_trace, 0, kBytes) != cudaSuccess)
      return g_trace = nullptr;
  }
  const long long seq = g_trace_seq.fetch_add(1);
  return g_trace + (seq % kTraceLaunches) * kTraceMaxBlocks * kTraceWords;
}
#else
unsigned long long* trace_records() { return nullptr; }
#endif

NsaSelStatus cuda_status(cudaError_t err, const char* what) {
  // The failed call's error is this status now: consume the runtime's record of it, so that the
  // next call's launch check (cudaGetLastError) does not report it again (a sticky error stays
  // sticky whatever is consumed).
  (void)cudaGetLastError();
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
    default: return fail(NSA_SEL_ERR_CUDA, "%s: %s", what, cudaGetErrorString(err));
  }
}

namespace {
// NSA_SEL_DEBUG_<NAME>=k forces a planning choice for tuning experiments; read once. 0: unset.
int debug_knob(const char* name) {
  const char* env = std::getenv(name);
  return env ? std::atoi(env) : 0;
}
}  // namespace

// NSA_SEL_DEBUG_PLAN=1: each distinct plan a launch ends with, once per process, on stderr, for
// tuning runs (what a forced knob and the launcher's occupancy checks left).
void report_plan(const NsaSelParams& p, int splits, int teams, int stages, bool kv_split,
                 int smem, bool tma, bool early) {
  static const bool on = debug_knob("NSA_SEL_DEBUG_PLAN") == 1;
  if (!on) return;
  char line[256];
  std::snprintf(line, sizeof line,
                "nsa_sel plan: b=%lld g=%lld h=%lld d=%lld/%lld n=%lld -> splits=%d teams=%d "
                "stages=%d kv_split=%d smem=%d tma=%d early=%d\n",
                static_cast<long long>(p.b), static_cast<long long>(p.g),
                static_cast<long long>(p.h), static_cast<long long>(p.d_k),
                static_cast<long long>(p.d_v), static_cast<long long>(p.n), splits, teams, stages,
                kv_split ? 1 : 0, smem, tma ? 1 : 0, early ? 1 : 0);
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  if (seen.insert(line).second) std::fputs(line, stderr);
}

// Rounds of the main loop before its end at which each block lets the next kernel in the stream
// launch (programmatic dependent launch).
int plan_pdl_lead() {
  static const int forced = debug_knob("NSA_SEL_DEBUG_PDL_LEAD");
  return forced > 0 ? forced : 2;
}

// One-team blocks of one m-tile run the split K/V pipeline (K and V of a tile as copy groups of
// their own) where they run one stage: a block's loads then overlap its own math (the next
// tile's K during PV, the tile's V during QK^T) with no more shared memory. Measured on the H200
// (NOTES.md v14, cold graph us, off -> on, two runs): nsa27b B=128 82.7/83.0 -> 81.9/82.2, d128
// B=128 67.2/66.7 -> 66.8/66.6, seed D=128 L=512 N=1024 66.7/66.8 -> 66.2/66.2. Where a block
// already pipelines 2+ stages the extra barriers cost more than the finer overlap gives: nsa27b
// B=64 44.0 -> 44.9, B=16 17.3 -> 17.9, d128 B=64 38.0 -> 38.6, seed D=64 L=512 38.0 -> 38.6.
// NSA_SEL_DEBUG_KVSPLIT=1 turns it off, 2 on at every stage count.
bool plan_kv_split(int stages) {
  static const int forced = debug_knob("NSA_SEL_DEBUG_KVSPLIT");
  if (forced == 1 || forced == 2) return forced == 2;
  return stages == 1;
}

// The early first-tile issue (the kernel's EARLY variant: the ranges read and scanned before the
// wait for the previous kernel, checked after it while the prologue's tiles stream in) where the
// blocks come in one wave of more than one per SM, with 2 stages: every block then starts
// together after the previous kernel, so that start-up is exposed. Measured on the H200 (cold
// graph us, two runs, off / on): v24, nsa27b B=64 44.2, 44.1 / 43.5, 43.5 (NOTES.md); the v23
// kernel, which issued the first tile before the block barrier instead, 43.2, 43.4 / 42.9, 42.9
// and d128 B=64 38.2, 38.0 / 37.6, 37.5. The v23 kernel was slower at 6 stages (m125 B=128, one
// wave: 24.1, 24.2 / 24.9, 25.1) and no faster over several waves (seed D=128 L=128 B=1024:
// 24.6, 24.7 / 24.8, 24.7); v24 gains 0-0.1 us at B=1 (nsa27b 5.48, 5.55 / 5.48, 5.56; m125
// 4.18, 4.06 / 4.05, 3.99), not enough to widen the rule on one measurement. n <= 32: the rule
// was measured there. NSA_SEL_DEBUG_EARLY_TMA=1 turns it off, 2 on wherever the kernel allows it,
// 3 as 2 with the check always failing (the start-over path, for tests).
bool early_recheck_forced() {
  static const bool forced = debug_knob("NSA_SEL_DEBUG_EARLY_TMA") == 3;
  return forced;
}

bool plan_early_issue(const NsaSelParams& p, const DeviceInfo& dev, int64_t blocks, int stages) {
  static const int forced = debug_knob("NSA_SEL_DEBUG_EARLY_TMA");
  if (p.n > 32 || forced == 1) return false;
  return forced >= 2 ||
         (stages == 2 && blocks > dev.sm_count && blocks <= 2 * static_cast<int64_t>(dev.sm_count));
}

// The tensor-copy path costs where it is compiled in even when no tile takes it: the v24 kernel
// with the path compiled out (tma constexpr false, v24c) against the v24 kernel on one H200,
// interleaved, cold graph us (NOTES.md v25): m125 B=128 (one team, 6 stages) 22.1, 22.1 against
// 23.9, 23.9, and 23.7, 23.8 with the maps off (NSA_SEL_DEBUG_NO_TMA=1); d128 B=64 (one team, 3
// stages) 37.9, 37.8 / 38.5, 38.5; m125 B=64 (four teams) 12.1, 12.3 / 12.4, 12.4. Where the path
// is taken and pays it stays: rows split (nsa27b B=1 5.66, 5.60 without / 5.55, 5.49 with),
// the split K/V kernel (d128 B=128 67.9, 68.0 / 67.7, 67.4; nsa27b B=128 even), and the early
// kernel, whose rule was measured with it (nsa27b B=64 43.8-44.1 / 43.7, 43.4). Even at nsa27b
// B=16 (two teams, 2 splits). NSA_SEL_DEBUG_NO_TMA=2 takes the kernels with the path everywhere
// (for A/B runs; 1 turns the tensor maps off).
bool plan_tma_kernel(int splits, bool kv_split, bool early) {
  static const bool everywhere = debug_knob("NSA_SEL_DEBUG_NO_TMA") == 2;
  return everywhere || splits > 1 || kv_split || early;
}

// Tensor maps of K and V as 4D tensors [b][g][s_kv][d] (the kernel's tensor copies read boxes of
// 64 tokens x 64 columns with the 128-byte swizzle). cuTensorMapEncodeTiled is a driver
// function: its address is asked of the runtime once, so the library links no libcuda.
// NSA_SEL_DEBUG_NO_TMA=1 turns the tensor copies off (every tile by cp.async).
bool make_kv_maps(const NsaSelParams& p, const DeviceInfo& dev, CUtensorMap* tk,
                  CUtensorMap* tv) {
  static const bool off = debug_knob("NSA_SEL_DEBUG_NO_TMA") == 1;
  // NSA_SEL_DEBUG_L2PROMO (tuning): the maps' L2 promotion, 1 none, 2 64 B, 3 128 B (default),
  // 4 256 B.
  static const CUtensorMapL2promotion promo = [] {
    switch (debug_knob("NSA_SEL_DEBUG_L2PROMO")) {
      case 1: return CU_TENSOR_MAP_L2_PROMOTION_NONE;
      case 2: return CU_TENSOR_MAP_L2_PROMOTION_L2_64B;
      case 4: return CU_TENSOR_MAP_L2_PROMOTION_L2_256B;
      default: return CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
    }
  }();
  if (off || dev.cc_major < 9 || p.b < 1 || p.g < 1 || p.s_kv < 1) return false;
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return false;
  const CUtensorMapDataType type =
      p.dtype == NSA_SEL_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  auto make = [&](CUtensorMap* m, const void* base, int64_t d, int64_t st, int64_t sg,
                  int64_t sb) {
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(p.s_kv),
                                static_cast<cuuint64_t>(p.g), static_cast<cuuint64_t>(p.b)};
    // Bytes; a dimension of extent 1 is never stepped, so any valid stride stands for it.
    auto bytes = [&](int64_t stride, int64_t extent) {
      return static_cast<cuuint64_t>(extent == 1 || stride <= 0 ? 16 * d : stride * 2);
    };
    const cuuint64_t strides[3] = {bytes(st, p.s_kv), bytes(sg, p.g), bytes(sb, p.b)};
    const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(kTileTokens), 1, 1};
    const cuuint32_t unit[4] = {1, 1, 1, 1};
    return encode(m, type, 4, const_cast<void*>(base), dims, strides, box, unit,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  promo, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  // The maps are a function of these fields alone, so this thread's last pair answers a call
  // with the same ones (a decode loop calls with the same cache tensors step after step) without
  // encoding again: two encodings were most of the eager path's host cost of the maps.
  struct Key {
    const void* k = nullptr;
    const void* v = nullptr;
    int64_t f[12] = {};
    bool operator==(const Key& o) const {
      return k == o.k && v == o.v && std::equal(std::begin(f), std::end(f), std::begin(o.f));
    }
  };
  struct Last {
    Key key;
    CUtensorMap tk, tv;
    bool valid = false;
  };
  thread_local Last last;
  const Key key{p.k,
                p.v,
                {p.d_k, p.d_v, p.s_kv, p.g, p.b, p.k_stride_t, p.k_stride_g, p.k_stride_b,
                 p.v_stride_t, p.v_stride_g, p.v_stride_b, static_cast<int64_t>(p.dtype)}};
  if (last.valid && last.key == key) {
    *tk = last.tk;
    *tv = last.tv;
    return true;
  }
  if (!make(tk, p.k, p.d_k, p.k_stride_t, p.k_stride_g, p.k_stride_b) ||
      !make(tv, p.v, p.d_v, p.v_stride_t, p.v_stride_g, p.v_stride_b))
    return false;
  last.key = key;
  last.tk = *tk;
  last.tv = *tv;
  last.valid = true;
  return true;
}

int64_t tiles_bound(const NsaSelParams& p) {
  return std::max<int64_t>((p.n * p.s_kv + 63) / 64, 1);  // n * s_kv < 2^31 (decode_supported)
}

int64_t expected_tiles(const NsaSelParams& p) {
  return p.n > 1 ? std::min<int64_t>(p.n, tiles_bound(p)) : tiles_bound(p);
}

// Splits per (b, g) row, from shapes and the device only (never from ranges contents), on GPUs
// with thread block clusters (the combine runs through distributed shared memory): the largest
// power of two, at most 8 (one portable cluster) and one split per 64-token tile a row could
// hold, such that rows * splits stays within one block per SM; 16 (a non-portable cluster, h <=
// 16 only) where 16 splits take at most half the SMs. The B=1 time is one launch with a fixed
// chain of latencies, and each SM's share of the bytes sets how long its reads take: a probe
// that only reads the nsa27b B=1 selection (bench/probes/gather_cluster.cu, H200) took 3.8 us
// over 32 blocks of 80 KB, 2.7 over 64 of 40 KB, whatever the cluster size. Measured (NOTES.md
// v19, cold graph us, A/B on one H200): nsa27b B=1 5.60 with 16 splits against 5.73-5.84 with
// 8, d128 B=1 5.23-5.43 against 5.42-5.52, m125 B=1 4.00 against 4.14-4.26 (8 x 2 teams), m125
// B=2 4.28 against 4.46; but nsa27b B=2 (128 blocks of 16-block clusters) 7.2-7.4 against 6.2.
// Where a block cannot hold two warp teams (h > 16), rows of at most 16 KB tiles that would stay
// unsplit get 2 splits when that fits two blocks per SM: one such block cannot keep enough bytes
// in flight (with h <= 16 two teams do that job without a combine). Measured on the H100
// (NOTES.md): 40 KB tiles (nsa27b B=16) take 25.6 us with 4 splits against 20.9 with 2;
// splitting rows that already fill the SMs costs 7% (d128 B=64); 16 KB tiles: m125 B=64 takes
// 18.2 us with 2 splits against 19.7 unsplit (17.6 unsplit with 2 teams), but m125 B=16 13.0 us
// with 8 splits against 10.9 with 4.
int plan_splits(const NsaSelParams& p, const DeviceInfo& dev, int tile_bytes, int max_teams) {
  if (dev.cc_major < 9) return 1;
  static const int forced = debug_knob("NSA_SEL_DEBUG_SPLITS");
  const int most = m_tiles_for_heads(p.h) == 1 ? kMaxSplits : kMaxSplitsMulti;
  if (forced == 1 || forced == 2 || forced == 4 || forced == 8 || forced == 16)
    return std::min(forced, most);
  const int64_t rows = p.b * p.g;
  const int64_t max_tiles = tiles_bound(p);
  const int64_t sms = dev.sm_count;
  int splits = 1;
  // (16 splits, clusters past the portable size, only where they take at most half the SMs.)
  while (splits * 2 <= most && splits * 2 <= max_tiles && rows * splits * 2 <= sms &&
         (splits * 2 <= kPortableCluster || rows * splits * 4 <= sms))
    splits *= 2;
  if (splits == 1 && max_teams == 1 && tile_bytes <= 16 * 1024 && max_tiles >= 2 && rows <= sms)
    splits = 2;
  return splits;
}

// Pipeline stages per team: as many as fit about 96 KB of K/V tiles (2 one-team blocks per SM),
// except that blocks of at most 32 KB tiles that come in more than two waves of 2 per SM keep
// 48 KB of 16 KB tiles (4 blocks per SM) or 64 KB of 32 KB tiles (3 per SM), so that the latency
// a block spends before its first tile lands (ranges, then K/V) overlaps the streaming of the
// others; two-team blocks (one per SM) keep about 64 KB per team, four-team blocks 2 stages a
// team (plan_teams: 16 KB tiles, so 128 KB a block). Measured on the H100
// (NOTES.md v7-v8): seed D=128 L=256 B=1024 52.6 us with 2 stages against 54.4 with 3 (L=512:
// 97.5 either way); 2 teams: d128 B=16 17.7 us with 2 stages of 32 KB against 18.4 with 3,
// m125 B=64 16.6 with 4 stages of 16 KB, 17.6 with 6, 18.7 with 3.
// Where every block has an SM (blocks <= SMs), a team keeps no more stages than the tiles it
// expects (n / (splits x teams), at least 2): a stage it will never fill only costs. Measured on
// the H200 (NOTES.md v18, cold graph us, two runs): d128 B=1 (8 splits, 2 tiles a block) 5.44 /
// 5.46 with 2 stages against 5.78 / 5.73 with 3; m125 B=1 (8 splits x 2 teams, 1 tile a team)
// 4.14 / 4.23 with 2 against 4.37 / 4.29 with 4; m125 B=4 4.92 / 4.94 against 5.18 / 5.06.
int plan_stages(const NsaSelParams& p, const DeviceInfo& dev, int splits, int teams, int tile_bytes,
                int max_stages) {
  static const int forced = debug_knob("NSA_SEL_DEBUG_STAGES");
  if (forced >= 1) return std::min(forced, max_stages);
  if (teams == 4) return 2;  // 32 KB a team (m125 B=64: 12.1 us against 12.8 with 3)
  const int64_t blocks = p.b * p.g * splits;
  int stages;
  if (teams > 1)
    stages = std::min(std::max(64 * 1024 / tile_bytes, 2), max_stages);
  else if (tile_bytes <= 32 * 1024 && blocks > 4 * static_cast<int64_t>(dev.sm_count))
    stages =
        std::min(std::max((tile_bytes <= 16 * 1024 ? 48 : 64) * 1024 / tile_bytes, 2), max_stages);
  else
    stages = std::min(std::max(96 * 1024 / tile_bytes, 2), max_stages);
  if (blocks <= dev.sm_count) {
    const int64_t per_team = (expected_tiles(p) + splits * teams - 1) / (splits * teams);
    stages = static_cast<int>(std::min<int64_t>(stages, std::max<int64_t>(per_team, 2)));
  }
  return stages;
}

// Whether NSA_SEL_DEBUG_STAGES forces the stage count (the launcher then leaves it as planned).
bool stages_forced() {
  static const bool forced = debug_knob("NSA_SEL_DEBUG_STAGES") >= 1;
  return forced;
}

// Warp teams per block: 2 where every block has an SM to itself (blocks <= SMs) and each team can
// expect 2 tiles or more, so that it overlaps its own loads and math (for 16 KB tiles, 1 tile or
// more); 1 otherwise. The expected tiles per block come from the NSA selection of n blocks of 64
// tokens (n / splits); like every planning choice it depends on shapes only, never on contents,
// and never affects correctness. Measured on the H100 (NOTES.md v8): nsa27b B=16 20.8 us with 2
// teams against 22.1 with 1, d128 B=16 17.8-18.4 against 19.9; with one tile per team (B=1, 8
// splits) the two tiles' loads land together instead of one after the other: nsa27b B=1 7.7
// against 7.3 (40 KB tiles), d128 B=1 7.0 either way (32 KB), m125 B=1 5.3 against 5.6 (16 KB).
// Where several blocks share an SM, they stay out of phase on their own (one 8-warp block per SM
// in lock-step measured worse, NOTES.md v2-v4). Two teams also replace the last doubling of the
// splits where the halved grid still spans a third of the SMs and each team still expects 2
// tiles: nsa27b B=4 10.4 us (4 splits, 2 teams) against 10.6 (8 splits, 1 team), d128 B=4 9.3
// against 9.8, m125 B=16 8.6 (2 splits) against 9.3 (4); but over 32 blocks or fewer, where each
// SM's own intake limits the load, halving lost (m125 B=4 6.3 against 5.9, nsa27b B=1 7.6
// against 6.8). Nor where each of two teams would still expect 4 tiles or more without the
// halving: the blocks are then long enough to stream on twice the SMs. Measured on the H200
// (NOTES.md v17, cold graph us, two runs): nsa27b B=16 15.3 / 15.3 with 2 splits x 2 teams
// against 17.0 / 17.1 unsplit, d128 B=16 13.2 / 13.2 against 15.5 / 15.5; where they would
// expect 2, halving still won: nsa27b B=8 11.3 (2 splits x 2 teams) against 12.6 (4 x 2), d128
// B=8 10.4 against 10.9, nsa27b B=4 8.8 (4 x 2) against 9.1 (8 x 2), d128 B=4 8.0 against 8.7.
// (On the H100, in v11, the unsplit plan was 0.3-0.5 us ahead at B=16.) `splits` is updated in
// place. The launcher drops the second team (and restores the splits) when the clusters would
// not all fit on the GPU at once (sel_decode_launch.cuh).
int plan_teams(const NsaSelParams& p, const DeviceInfo& dev, int& splits, int tile_bytes,
               int max_teams) {
  static const int forced = debug_knob("NSA_SEL_DEBUG_TEAMS");
  static const bool splits_forced = debug_knob("NSA_SEL_DEBUG_SPLITS") != 0;
  if (forced >= 1) {
    const int t = std::min(forced, max_teams);
    return t >= 4 ? 4 : t >= 2 ? 2 : 1;  // the kernels are instantiated for 1, 2 and 4
  }
  const int64_t rows = p.b * p.g;
  if (max_teams < 2 || rows * splits > dev.sm_count) return 1;
  int teams = 1;
  if (!splits_forced && splits >= 2 && p.n >= 4 * (splits / 2) && p.n < 8 * splits &&
      3 * rows * (splits / 2) >= dev.sm_count) {
    splits /= 2;
    teams = 2;
  } else if (p.n >= 4 * splits || (tile_bytes <= 16 * 1024 && p.n >= 2 * splits)) {
    teams = 2;
  }
  // Four teams (16 warps; blocks of 16 KB tiles only) where each still expects 2 tiles or more.
  // With 8 warps per SM a team's chain of dependent latencies per tile, not DRAM, set the pace
  // (warm L2 took nearly the cold time). Measured on the H200 (NOTES.md v15, cold graph us):
  // m125 B=64 13.2-13.5 -> 12.1 (2 stages; warm 12.7-12.9 -> 9.7), m125 B=16 (2 splits) 7.9 ->
  // 7.5; m125 B=128 (rows in waves) 22.0 against 24.4, which the rule above already excludes.
  if (teams == 2 && max_teams >= 4 && p.n >= 8 * splits) teams = 4;
  return teams;
}

namespace {
// Makes `device` current for one call and gives the calling thread its own current device back
// afterwards: a C++ engine's (or PyTorch's, which reads it with cudaGetDevice) current device is
// never changed behind its back. No call when `device` is already current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) {
      (void)cudaGetLastError();
      prev = -1;
    }
    if (prev == device) return;
    err_ = cudaSetDevice(device);
    if (err_ == cudaSuccess && prev >= 0) restore_ = prev;
  }
  ~DeviceGuard() {
    if (restore_ >= 0) (void)cudaSetDevice(restore_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t error() const { return err_; }

 private:
  cudaError_t err_ = cudaSuccess;
  int restore_ = -1;
};
}  // namespace

}  // namespace nsa_sel

extern "C" NsaSelStatus nsa_sel_decode_cuda(const NsaSelParams* p, int32_t device, void* stream) {
  using namespace nsa_sel;
  if (p == nullptr) return fail(NSA_SEL_ERR_INVALID_ARGUMENT, "p: expected non-NULL");
  const NsaSelStatus supported = decode_supported(*p);
  if (supported != NSA_SEL_OK) return supported;

  const DeviceGuard guard(device);
  cudaError_t err = guard.error();
  if (err != cudaSuccess) return cuda_status(err, "cudaSetDevice");
  DeviceInfo dev;
  err = device_info(device, &dev);
  if (err != cudaSuccess) return cuda_status(err, "cudaDeviceGetAttribute");

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == NSA_SEL_BF16) return dispatch_dims<__nv_bfloat16>(*p, device, dev, s);
  return dispatch_dims<__half>(*p, device, dev, s);
}

#ifdef NSA_SEL_TRACE
// Copies the trace ring (kTraceLaunches x kTraceMaxBlocks x kTraceWords words) to `host`
// (capacity in words) after a device synchronisation; returns the number of launches traced so
// far (launch k lives in ring slot k % kTraceLaunches), or -1 on failure.
extern "C" long long nsa_sel_trace_fetch(unsigned long long* host, long long capacity) {
  using namespace nsa_sel;
  const long long words = static_cast<long long>(kTraceLaunches) * kTraceMaxBlocks * kTraceWords;
  if (g_trace == nullptr || capacity < words) return -1;
  if (cudaDeviceSynchronize() != cudaSuccess) return -1;
  if (cudaMemcpy(host, g_trace, words * sizeof(unsigned long long), cudaMemcpyDeviceToHost) !=
      cudaSuccess)
    return -1;
  return g_trace_seq.load();
}
#endif
