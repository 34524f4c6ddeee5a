// Selection-attention decode kernel (S == 1).
//
// Grid:  rows * splits blocks, rows = b * g; the `splits` blocks of one (b, g) row form one thread
//        block cluster (sm_90) and each takes an equal share of the row's selected 64-token tiles.
// Block: TEAMS (1, 2, or 4 for 16 KB tiles) teams of kWarps warps. Warp w of a team owns m-tile
//        (w % MT) of 16 query heads and token slice (w / MT) of each 64-token tile, so every
//        selected K/V row is loaded once per block for all heads; with several teams each takes
//        every TEAMS-th tile of the block's share through its own pipeline (named barriers), so
//        that many tiles stream and compute at once where a block has an SM to itself.
//
// Data flow per block: the clamped ranges of the row go to shared memory with their exclusive
// prefix sums, so the selected tokens form one virtual sequence of length total. Tiles of 64
// positions of that sequence stream through a cp.async pipeline (zero-filled past the end: a row
// that is not selected is never read); tensor cores compute S = Q K^T and O += P V with fp32
// accumulation and an online softmax in exp2 form. The warps' states are then merged in shared
// memory; split blocks push their merged state, a 1/splits share of the output columns to each
// block of the cluster (st.async into distributed shared memory, counted by the receiver's
// mbarrier), and each block combines its share in split order, so the result is deterministic.
// The number of pipeline stages is a launch parameter (shared memory is sized for it), so that
// blocks of small tiles can fit 4 to an SM, and so that many-wave shapes can run one stage (a
// block loads a tile, computes it, then loads the next) to fit more blocks per SM. The one-team
// kernel of one stage runs with KV_SPLIT: K and V of a tile are copy groups of their own, so the
// next tile's K streams in during PV and the tile's V during QK^T, with no more shared memory.
#pragma once

#include <cuda.h>  // CUtensorMap (a plain struct: no driver library is linked)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define NSA_SEL_HAS_CLUSTERS 1
#endif

#include "nsa_sel/sel_attention.h"
#include "plan.hpp"

namespace nsa_sel {

// Most blocks (splits) per (b, g) row: 16, the Hopper non-portable thread block cluster size,
// for blocks of one m-tile (h <= 16); 8, the portable size, otherwise (the launcher opts in to
// clusters of more than 8 blocks). The combine weighs the splits' states in chunks of
// kCombineChunk, one thread per chunk. (On the H100 in v6, with the combine of then, 16 splits
// measured slower at B=1: nsa27b 8.3 us against 7.1 with 8; on the H200 with today's, faster.)
constexpr int kPortableCluster = 8;  // most blocks of a cluster without the opt-in
constexpr int kMaxSplits = 16;
constexpr int kMaxSplitsMulti = kPortableCluster;  // blocks of 2 or 4 m-tiles
constexpr int kCombineChunk = kPortableCluster;
static_assert(kMaxSplits <= 2 * kCombineChunk, "the combine weighs at most two chunks a group");

template <typename T, int DK, int DV, int MT>
struct DecodeTraits {
  static constexpr int kTile = kTileTokens;       // tokens per pipeline stage
  static constexpr int kWarps = MT == 1 ? 4 : 8;  // warps of one team: 128 or 256 threads
  static constexpr int kThreads = kWarps * 32;
  // A block holds 1 or kMaxTeams teams (a template parameter of the kernel, so that the one-team
  // kernel carries no team arithmetic). Each team has its own copy of Q, its
  // own pipeline stages and token buffers, and takes every teams-th tile of the block's share, so
  // the teams stream and compute that many tiles at once with no block barrier between them
  // (named barriers per team). Used when blocks do not outnumber SMs: a lone 4-warp block per SM
  // spends most of each tile in dependent latency.
  static constexpr int kMaxTeams = max_teams_for(MT, tile_bytes_for(DK, DV));  // plan.hpp
  static constexpr int kSlices = kWarps / MT;  // token slices of a tile
  static constexpr int kTokPerWarp = kTile / kSlices;
  // K/V tiles in shared memory: by default about 96 KB per block, so that each block keeps 48-80
  // KB of loads in flight (a block's bandwidth is its bytes in flight over the memory latency).
  // kStages is the most stages (up to about 200 KB of tiles, for a block alone on its SM); the
  // launch picks the number (2..kStages, plan_stages, or 1 where that makes more blocks
  // resident, the launcher) and sizes shared memory for it.
  static constexpr int kTileBytes = tile_bytes_for(DK, DV);
  static constexpr int kStages = max_stages_for(kTileBytes);  // plan.hpp
  static constexpr int kTokBufs = kStages + 1;  // token-index buffers (see the main loop)
  // Per team: kTokBufs buffers of kTile token indices, then kTokBufs tile starts (padded to 16).
  static constexpr int kTokInts = kTokBufs * kTile + 16;
  static constexpr int kChunksK = DK * 2 / 16;  // 16-byte chunks per K row
  static constexpr int kChunksV = DV * 2 / 16;
  static constexpr int kHeads = MT * 16;  // padded heads
  // fp32 row stride of the merge buffers: 8 banks between rows, so that the publish's 8-byte
  // stores (4 rows of 32 bytes per half warp) hit every bank once (DV + 4 hit half the banks
  // twice).
  static constexpr int kOStride = DV + 8;

  static_assert(sizeof(T) == 2, "T must be a 16-bit float type");
  static_assert(DK % 64 == 0 && DV % 64 == 0, "the XOR swizzle needs rows of 8k 16-byte chunks");
  static_assert(kTokPerWarp % 16 == 0, "a warp's token slice must be whole k16 steps");
  static_assert(kSlices * MT == kWarps, "warps must tile (m-tile, slice) exactly");
  static_assert(kThreads % 64 == 0 && kTile % (kThreads / 8) == 0,
                "the load mapping needs rows per pass (threads / 8) to be a multiple of 8");

  // Shared memory layout (bytes), all offsets multiples of 16 and the K/V stages multiples of 1024
  // (the tensor copies' 128-byte swizzle repeats every 1024 bytes); per-team areas are indexed by
  // team.
  static constexpr int kQBytes = kHeads * DK * 2;
  // A stage: K, then V, each as column blocks of 64 elements [DK / 64][kTile rows][128 bytes]
  // (the box of one tensor copy; see kv_off).
  static constexpr int kKStageBytes = kTile * DK * 2;
  static_assert(kQBytes % 1024 == 0 && kKStageBytes % 1024 == 0 && kTileBytes % 1024 == 0,
                "the K/V stages must start on 1024-byte boundaries");
  // After the main loop the K/V stages are reused for the merges.
  static constexpr int kStateBytes = kHeads * (kOStride + 2) * 4;  // one (O, m, l) set
  static constexpr int kMergeBytes = kSlices * kStateBytes;        // per team
  static constexpr int kOffQ = 0;                                  // Q [teams]
  __host__ __device__ static constexpr int off_kv(int teams) { return kOffQ + teams * kQBytes; }
  // Split blocks only: the combine's receive area, written by the peers of the cluster at any
  // time after they finish their own tiles, so it overlaps nothing: O [splits][kHeads][DV/splits]
  // then (m, l) [splits][kHeads][2], fp32.
  __host__ __device__ static constexpr int recv_bytes(int splits) {
    return kHeads * DV * 4 + splits * kHeads * 2 * 4;
  }
  // The receive area and, after it, the mbarrier that counts the bytes arriving there.
  __host__ __device__ static constexpr int recv_area(int splits) { return recv_bytes(splits) + 16; }
  // K/V stages [teams][stages], later the merge states [teams][kSlices].
  __host__ __device__ static constexpr int off_tok(int stages, int teams) {
    return off_kv(teams) +
           teams * (stages * kTileBytes > kMergeBytes ? stages * kTileBytes : kMergeBytes);
  }
  __host__ __device__ static constexpr int off_recv(int stages, int teams) {
    return off_tok(stages, teams) + teams * kTokInts * 4;
  }
  // The tensor copies' mbarriers: [teams][stages][K, V].
  __host__ __device__ static constexpr int off_bars(int stages, int splits, int teams) {
    return off_recv(stages, teams) + (splits > 1 ? recv_area(splits) : 0);
  }
  __host__ __device__ static constexpr int off_ranges(int stages, int splits, int teams) {
    return off_bars(stages, splits, teams) + teams * stages * 16;
  }
  __host__ __device__ static constexpr int smem_bytes(int64_t n, int stages, int splits,
                                                      int teams) {
    return off_ranges(stages, splits, teams) + static_cast<int>(n) * 8 + 16;
  }
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; with valid == false it writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// cp.async.wait_group with a block-uniform runtime count in [0, 11].
__device__ __forceinline__ void cp_async_wait_rt(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    case 7: cp_async_wait<7>(); break;
    case 8: cp_async_wait<8>(); break;
    case 9: cp_async_wait<9>(); break;
    case 10: cp_async_wait<10>(); break;
    default: cp_async_wait<11>(); break;
  }
}

// Barrier of one team of `THREADS` threads: the block barrier when the block is one team, else
// named barrier 1 + team (0 is __syncthreads). The ids are immediates so that the kernel reserves
// 3 hardware barriers, not all 16.
template <int TEAMS, int THREADS>
__device__ __forceinline__ void team_sync(int team) {
  if constexpr (TEAMS == 1) {
    __syncthreads();
  } else if constexpr (TEAMS == 2) {
    if (team == 0)
      asm volatile("bar.sync 1, %0;\n" ::"n"(THREADS) : "memory");
    else
      asm volatile("bar.sync 2, %0;\n" ::"n"(THREADS) : "memory");
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(team + 1), "n"(THREADS) : "memory");  // ids 1..TEAMS
  }
}

// Distributed shared memory with transaction counts (sm_90): the split combine's pushes land in
// the owner's receive area and count their bytes on the owner's mbarrier, so the owner waits for
// its data only (one-way), not for a cluster-wide barrier round trip.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
               : "memory");
}
// (The mbarrier wrappers below are sm_90 instructions: empty before, where no path calls them.)
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef NSA_SEL_HAS_CLUSTERS
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Waits for phase 0 of the barrier, with acquire semantics at cluster scope (the peers' st.async
// data is visible afterwards).
__device__ __forceinline__ void mbar_wait_phase0_cluster(uint64_t* bar) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n"
        " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar))
        : "memory");
  } while (!done);
}
// The shared::cluster address of `local` (an address of this block's shared memory) in block
// `rank` of the cluster.
__device__ __forceinline__ uint32_t map_rank(const void* local, int rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(r)
               : "r"(smem_addr(local)), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_async(uint32_t addr, float4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(addr),
      "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void st_async(uint32_t addr, float2 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\n" ::"r"(
          addr),
      "f"(v.x), "f"(v.y), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x in one MUFU op (max relative error 2^-22; exp2(-inf) = +0, NaN stays NaN).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of `chunks`-chunk rows. The XOR
// swizzle spreads the 8 rows an ldmatrix reads over all 32 banks.
__device__ __forceinline__ int swz(int row, int chunk, int chunks) {
  return (row * chunks + (chunk ^ (row & 7))) * 16;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a K or V stage, stored as column blocks of
// 64 elements: [chunk / 8][kTileTokens rows][128 bytes], the chunk XORed with (row & 7) within
// its 128-byte row. That is the layout a tensor copy of a 64-column box with the 128-byte
// swizzle writes at a 1024-byte aligned address, and ldmatrix's 8 rows hit all 32 banks.
__device__ __forceinline__ int kv_off(int row, int chunk) {
  return ((chunk >> 3) * kTileTokens + row) * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

__device__ __forceinline__ int64_t load_idx(const void* base, int32_t type, int64_t off) {
  return type == NSA_SEL_I64 ? static_cast<const int64_t*>(base)[off]
                             : static_cast<int64_t>(static_cast<const int32_t*>(base)[off]);
}

// Online-softmax state merge: (m, l, o) absorbs (m2, l2, o2), both in the log2 domain.
// An empty state has m = -inf and l = 0; the reference point falls back to 0 when both maxima are
// -inf, so (-inf) - (-inf) never turns into NaN and an empty merge stays exactly empty.
__device__ __forceinline__ void merge_weights(float m, float m2, float& w, float& w2, float& mm) {
  mm = fmaxf(m, m2);
  const float ref = mm == -INFINITY ? 0.f : mm;
  w = fast_exp2(m - ref);
  w2 = fast_exp2(m2 - ref);
}

// Bulk tensor copies (TMA, sm_90): one box of a 4D tensor map [B][G][S_kv][D] (innermost
// last in the map's order: D, S_kv, G, B) into shared memory, counted on a CTA mbarrier.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, int c3, uint64_t* bar) {
#ifdef NSA_SEL_HAS_CLUSTERS
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_addr(bar))
      : "memory");
#endif
}
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
#ifdef NSA_SEL_HAS_CLUSTERS
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}
// Waits for the completion of phase `parity` (0 or 1) of a CTA mbarrier.
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, uint32_t parity) {
#ifdef NSA_SEL_HAS_CLUSTERS
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// Phase timestamps for tuning builds (-DNSA_SEL_TRACE=ON): thread 0 of each of the first
// kTraceMaxBlocks blocks writes %globaltimer (ns, comparable across SMs) into slot `i` < 15 and
// clock64 (SM cycles) into slot 16 + i of its 32-word record; slot 15 holds the SM id. Compiled out
// otherwise (the trace pointer is then always null and unused). (%globaltimer ticks in steps of
// about 32 ns on the H200, so profile_kernel.py times a block's phases by clock64.)
constexpr int kTraceMaxBlocks = 2048;
constexpr int kTraceWords = 32;
#ifdef NSA_SEL_TRACE
__device__ __forceinline__ void trace_mark(unsigned long long* rec, int i) {
  if (rec != nullptr && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    rec[i] = t;
    rec[16 + i] = static_cast<unsigned long long>(clock64());
    if (i == 0) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      rec[15] = sm;
    }
  }
}
#define NSA_SEL_TRACE_MARK(i) trace_mark(trace_rec, i)
#else
#define NSA_SEL_TRACE_MARK(i) ((void)0)
#endif

// ---------------------------------------------------------------------------------------------

// (clang-format reads the product in __launch_bounds__ as a pointer type.)
// clang-format off
template <typename T, int DK, int DV, int MT, int TEAMS, bool KV_SPLIT = false, bool EARLY = false,
          bool TMA = true>
__global__ void __launch_bounds__(DecodeTraits<T, DK, DV, MT>::kThreads * TEAMS)
    sel_decode_kernel(const NsaSelParams p, const __grid_constant__ CUtensorMap tmap_k,
                      const __grid_constant__ CUtensorMap tmap_v, const int tma_on,
                      const float scale_log2, const int splits, const int stages,
                      const int pdl_lead, unsigned long long* trace) {
  // clang-format on
  using Tr = DecodeTraits<T, DK, DV, MT>;
  static_assert(TEAMS >= 1 && TEAMS <= Tr::kMaxTeams, "unsupported team count");
  // K and V as copy groups of their own (see the main loop): one-team blocks only, where every
  // thread meets the same barriers in every round.
  static_assert(!KV_SPLIT || TEAMS == 1, "the split K/V pipeline is for one-team blocks");
  // EARLY: the ranges are read ahead of the wait for the previous kernel, so that the first
  // tiles go out right after it (see the prologue); a variant of its own, as code of the kind
  // slowed the kernel where it ran without it (NOTES.md v23b).
  static_assert(!EARLY || (TEAMS == 1 && MT == 1 && !KV_SPLIT),
                "the early first-tile issue is for one-team, one-m-tile blocks of 2+ stages");
  // TMA: the tensor-copy path is compiled in. Without it the kernel is the same but for every
  // tile coming by cp.async: the path's code alone (taken or not) slowed the plain streaming
  // pipeline (NOTES.md v25), so the launch picks the kernel without it there (plan_tma_kernel).
  static_assert(!EARLY || TMA, "the early kernel's rule was measured with tensor copies");
  constexpr bool kv_split = KV_SPLIT;
  constexpr int teams = TEAMS;
  constexpr int nthreads = Tr::kThreads * TEAMS;  // == blockDim.x
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int team = TEAMS == 1 ? 0 : tid / Tr::kThreads;
  const int ttid = TEAMS == 1 ? tid : tid % Tr::kThreads;  // thread within the team
  unsigned char* q_s = smem + Tr::kOffQ + team * Tr::kQBytes;
  unsigned char* kv_s = smem + Tr::off_kv(teams);
  unsigned char* kv_team = kv_s + team * stages * Tr::kTileBytes;  // this team's stages
  int32_t* tok_s = reinterpret_cast<int32_t*>(smem + Tr::off_tok(stages, teams)) +
                   team * Tr::kTokInts;  // this team's [kTokBufs][64], then tile starts
  int32_t* excl_s =
      reinterpret_cast<int32_t*>(smem + Tr::off_ranges(stages, splits, teams));  // [n]
  int32_t* key_s = excl_s + p.n;                                                 // [n]
  int32_t* total_s = key_s + p.n;                                                // [1]
  // The tensor copies' mbarriers of this team: K of stage s at 2s, V at 2s + 1.
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Tr::off_bars(stages, splits, teams)) +
                   team * stages * 2;

  unsigned long long* trace_rec =
      trace != nullptr && blockIdx.x < kTraceMaxBlocks ? trace + blockIdx.x * kTraceWords : nullptr;
  (void)trace_rec;
  NSA_SEL_TRACE_MARK(0);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int twarp = ttid >> 5;   // warp within the team
  const int mt = twarp % MT;     // this warp's m-tile of 16 heads
  const int slice = twarp / MT;  // this warp's token slice of each tile

  const int64_t row = blockIdx.x / splits;
  const int split = static_cast<int>(blockIdx.x % splits);
  const int64_t b = row / p.g;
  const int64_t g = row % p.g;
  const T* q_row = static_cast<const T*>(p.q) + b * p.q_stride_b + g * p.q_stride_g;
  const T* k_row = static_cast<const T*>(p.k) + b * p.k_stride_b + g * p.k_stride_g;
  const T* v_row = static_cast<const T*>(p.v) + b * p.v_stride_b + g * p.v_stride_g;
  const unsigned char* r_base = static_cast<const unsigned char*>(p.ranges);
  const int64_t r_row = b * p.r_stride_b + g * p.r_stride_g;

  // K/V tiles that are 64 consecutive tokens of the cache (a whole tile inside one range) come in
  // by tensor copies (thread 0 of the team issues one per 64-column block, counted on the stage's
  // mbarrier), the others by the threads' cp.async. tma_on bit 0: the launch made the tensor
  // maps (bit 1: EARLY takes its ranges' check as failed, NSA_SEL_DEBUG_EARLY_TMA=3), and
  // the stages are where the maps' swizzle expects them (1024-byte aligned).
#ifdef NSA_SEL_HAS_CLUSTERS
  const bool tma = TMA && (tma_on & 1) != 0 && (smem_addr(smem) & 1023) == 0;
#else
  constexpr bool tma = false;
  (void)tma_on;
#endif
  if (tma && tid == 0) {
    prefetch_tensormap(&tmap_k);
    prefetch_tensormap(&tmap_v);
    uint64_t* all = reinterpret_cast<uint64_t*>(smem + Tr::off_bars(stages, splits, teams));
    for (int i = 0; i < teams * stages * 2; ++i) mbar_init(all + i, 1);
#ifdef NSA_SEL_HAS_CLUSTERS
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  }
  // The tensor copies of tile `it` (first token t0) into `stage`, by one thread of the team.
  auto issue_tma = [&](int t0, int stage, bool do_k, bool do_v) {
    unsigned char* k_st = kv_team + stage * Tr::kTileBytes;
    unsigned char* v_st = k_st + Tr::kKStageBytes;
    const int gi = static_cast<int>(g), bi = static_cast<int>(b);
    if (do_k) {
      mbar_arrive_expect_tx(bars + 2 * stage, Tr::kKStageBytes);
#pragma unroll
      for (int j = 0; j < DK / 64; ++j)
        tma_load_4d(k_st + j * Tr::kTile * 128, &tmap_k, j * 64, t0, gi, bi, bars + 2 * stage);
    }
    if (do_v) {
      mbar_arrive_expect_tx(bars + 2 * stage + 1, Tr::kTile * DV * 2);
#pragma unroll
      for (int j = 0; j < DV / 64; ++j)
        tma_load_4d(v_st + j * Tr::kTile * 128, &tmap_v, j * 64, t0, gi, bi,
                    bars + 2 * stage + 1);
    }
  };
#ifdef NSA_SEL_HAS_CLUSTERS
  // Split blocks write into their peers' shared memory at the end, which is allowed once every
  // block of the cluster has started and initialised the mbarrier that counts the bytes coming
  // in: announce it now, check it (for free, by then) before the first remote write. The
  // barrier expects every split's share of the valid heads: O columns and one (m, l) per head.
  // None of it reads an input, so it runs before the wait for the previous kernel, off the
  // critical path; it is done by warp 1, as warp 0 reads the ranges first thing after the wait.
  uint64_t* recv_bar =
      reinterpret_cast<uint64_t*>(smem + Tr::off_recv(stages, teams) + Tr::recv_bytes(splits));
  if (splits > 1) {
    if (tid == 32) {
      mbar_init(recv_bar, 1);
      // Per split and head: `share` float4 groups of O columns and one float2 (m, l).
      const int share_bytes = DV / 4 / splits * 16 + 8;
      mbar_arrive_expect_tx(recv_bar, static_cast<uint32_t>(splits * p.h * share_bytes));
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  }
  // Warm L2 (and the TLB) with this row's ranges, its kv_lens entry and Q while the previous
  // kernel may still be running. A prefetch reads nothing into the program: L2 is the device's
  // point of coherence, so a line the previous kernel writes afterwards is simply updated there.
  {
    const int es = p.index_type == NSA_SEL_I64 ? 8 : 4;
    const int64_t n_pf = p.n < 128 ? p.n : 128;
    if (tid < n_pf) prefetch_l2(r_base + (r_row + tid * p.r_stride_n) * es);
    if (p.kv_lens != nullptr && tid == nthreads - 1)
      prefetch_l2(static_cast<const unsigned char*>(p.kv_lens) +
                  b * p.kv_lens_stride_b * (p.kv_lens_type == NSA_SEL_I64 ? 8 : 4));
    constexpr int kLines = (DK * 2 + 127) / 128;  // 128-byte lines per Q row
    const int q_lines = static_cast<int>(p.h) * kLines;
    for (int c = tid; c < q_lines; c += nthreads)
      prefetch_l2(q_row + (c / kLines) * p.q_stride_h + (c % kLines) * 64);
  }
#endif

  // The row's ranges, clamped ([0, kv_len) for the single query at t = kv_len - 1; kv_len
  // clamped into [0, s_kv] so that a bad kv_lens value can never send a load out of the tensor),
  // become (exclusive prefix of lengths, start - prefix) per range and their total, by warp 0 in
  // chunks of 32. `check`: compare with what excl_s, key_s and total_s hold instead of writing
  // them; returns (warp-uniform) whether anything differs. `cg`: L2-only loads (never through L1,
  // so that a line read before the wait for the previous kernel cannot be served stale later).
  auto scan_ranges = [&](bool check, bool cg) {
    auto ld = [&](const void* base, int32_t type, int64_t off) -> int64_t {
      if (!cg) return load_idx(base, type, off);
      return type == NSA_SEL_I64
                 ? static_cast<int64_t>(__ldcg(static_cast<const long long*>(base) + off))
                 : static_cast<int64_t>(__ldcg(static_cast<const int*>(base) + off));
    };
    int64_t lim = p.s_kv;
    if (p.kv_lens != nullptr) {
      lim = ld(p.kv_lens, p.kv_lens_type, b * p.kv_lens_stride_b);
      lim = lim < 0 ? 0 : (lim > p.s_kv ? p.s_kv : lim);
    }
    int carry = 0;
    bool differs = false;
    for (int64_t base = 0; base < p.n; base += 32) {
      const int64_t i = base + lane;
      int len = 0, start = 0;
      if (i < p.n) {
        const int64_t off = r_row + i * p.r_stride_n;
        int64_t s0 = ld(r_base, p.index_type, off);
        int64_t e0 = ld(r_base, p.index_type, off + p.r_stride_e);
        s0 = s0 < 0 ? 0 : s0;
        e0 = e0 > lim ? lim : e0;
        if (e0 > s0) {
          len = static_cast<int>(e0 - s0);
          start = static_cast<int>(s0);
        }
      }
      int incl = len;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      if (i < p.n) {
        const int excl = carry + incl - len;
        if (check) {
          differs = differs || excl_s[i] != excl || key_s[i] != start - excl;
        } else {
          excl_s[i] = excl;
          key_s[i] = start - excl;
        }
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      if (check)
        differs = differs || *total_s != carry;
      else
        *total_s = carry;
    }
    return __any_sync(0xffffffffu, differs) != 0;
  };
  // Q of all (padded) heads, one copy per team; heads >= h are zero-filled and never stored.
  auto copy_q = [&] {
    for (int c = ttid; c < Tr::kHeads * (DK / 8); c += Tr::kThreads) {
      const int hh = c / (DK / 8), ch = c % (DK / 8);
      const bool valid = hh < p.h;
      const T* src = valid ? q_row + hh * p.q_stride_h + ch * 8 : q_row;
      cp_async16(q_s + swz(hh, ch, Tr::kChunksK), src, valid);
    }
  };

  // This block's tiles of the row's virtual sequence (set by derive() once the ranges are
  // scanned). This team's tiles: tile_begin + team + it * teams for it < team_tiles. Every team
  // runs `rounds` loop iterations (a team short of a tile only meets its barriers in the last
  // one), so all threads pass the same sequence of barriers.
  int total = 0, tile_begin = 0, team_tiles = 0, rounds = 0;
  auto derive = [&] {
    total = *total_s;
    const int n_tiles = (total + Tr::kTile - 1) / Tr::kTile;
    tile_begin = static_cast<int>(static_cast<int64_t>(n_tiles) * split / splits);
    const int tile_end = static_cast<int>(static_cast<int64_t>(n_tiles) * (split + 1) / splits);
    const int my_tiles = tile_end - tile_begin;
    team_tiles =
        TEAMS == 1 ? my_tiles : (my_tiles > team ? (my_tiles - team + teams - 1) / teams : 0);
    rounds = TEAMS == 1 ? my_tiles : (my_tiles + teams - 1) / teams;
  };
  const int n_ranges = static_cast<int>(p.n);

  // Stages whose K (bit 2s) or V (bit 2s + 1) is in flight by tensor copy, and the parity of
  // each mbarrier's next phase: the same in every thread of the team (tile_s decides).
  uint32_t tma_pending = 0, tma_parity = 0;
  // Token index of each position of the team's tile `it`, -1 past the end; and in tile_s the
  // tile's first token where all 64 lie in one range (the tile is 64 consecutive rows of the
  // cache: a tensor copy), else -1.
  int32_t* tile_s = tok_s + Tr::kTokBufs * Tr::kTile;  // [kTokBufs] after the token buffers
  // early: the prologue's tile `it`, whose stage (it) is free; thread 0 issues its tensor copies
  // at once (K, and V unless it is the split pipeline's last prologue tile, see below).
  auto fill_tok = [&](int it, bool early = false) {
    if (ttid < Tr::kTile) {
      const int pos = (tile_begin + team + it * teams) * Tr::kTile + ttid;
      int tok = -1;
      if (pos < total) {
        int lo = 0, hi = n_ranges;  // upper_bound(excl, pos) - 1: the last range starting <= pos
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (excl_s[mid] <= pos)
            lo = mid + 1;
          else
            hi = mid;
        }
        tok = key_s[lo - 1] + pos;
        if (ttid == 0) {
          const int next = lo < n_ranges ? excl_s[lo] : total;  // where range lo - 1 ends
          const bool whole = tma && next >= pos + Tr::kTile;
          tile_s[it % Tr::kTokBufs] = whole ? tok : -1;
          if (whole && early)
            issue_tma(tok, it, true, it + 1 < stages);
        }
      } else if (ttid == 0) {
        tile_s[it % Tr::kTokBufs] = -1;
      }
      tok_s[(it % Tr::kTokBufs) * Tr::kTile + ttid] = tok;
    }
  };
  // Thread t copies 16-byte column (t % 8) + 8j of rows t / 8 + k * kRowsPerPass: the swizzled
  // column (t % 8) ^ (row & 7) is the same for all of a thread's rows, each row costs one token
  // lookup and one 64-bit multiply, and a warp reads 4 rows x 128 contiguous bytes per copy.
  constexpr int kRowsPerPass = Tr::kThreads / 8;
  const int ld_row = ttid >> 3;
  const int ld_col = ((ttid & 7) ^ (ld_row & 7)) * 16;  // bytes; kRowsPerPass is a multiple of 8
  // `early`: thread 0 of the team issued this tile's tensor copies already (the prologue).
  auto issue_loads = [&](int it, int stage, bool do_k = true, bool do_v = true,
                         bool early = false) {
    const int t0 = TMA ? tile_s[it % Tr::kTokBufs] : -1;  // (no tensor-copy code where !TMA)
    if (t0 >= 0) {  // team-uniform
      if (ttid == 0 && !early) issue_tma(t0, stage, do_k, do_v);
      tma_pending |= (do_k ? 1u : 0u) << (2 * stage) | (do_v ? 2u : 0u) << (2 * stage);
      return;
    }
    const int32_t* tok = tok_s + (it % Tr::kTokBufs) * Tr::kTile;
    unsigned char* k_st = kv_team + stage * Tr::kTileBytes;
    unsigned char* v_st = k_st + Tr::kKStageBytes;
#pragma unroll
    for (int pass = 0; pass < Tr::kTile / kRowsPerPass; ++pass) {
      const int r = ld_row + pass * kRowsPerPass;
      const int t = tok[r];
      const bool valid = t >= 0;
      const T* k_src =
          k_row + (valid ? static_cast<int64_t>(t) * p.k_stride_t : 0) + (ttid & 7) * 8;
      const T* v_src =
          v_row + (valid ? static_cast<int64_t>(t) * p.v_stride_t : 0) + (ttid & 7) * 8;
      unsigned char* k_dst = k_st + r * 128 + ld_col;  // column block j at + j * kTile * 128
      unsigned char* v_dst = v_st + r * 128 + ld_col;
      if (do_k) {
#pragma unroll
        for (int j = 0; j < Tr::kChunksK / 8; ++j)
          cp_async16(k_dst + j * Tr::kTile * 128, k_src + j * 64, valid);
      }
      if (do_v) {
#pragma unroll
        for (int j = 0; j < Tr::kChunksV / 8; ++j)
          cp_async16(v_dst + j * Tr::kTile * 128, v_src + j * 64, valid);
      }
    }
  };
  // Waits for the tensor copies of `stage`'s K (v = 0) or V (v = 1) where they are in flight.
  auto wait_tma = [&](int stage, int v) {
    const uint32_t bit = 1u << (2 * stage + v);
    if (tma_pending & bit) {  // team-uniform
      mbar_wait_parity(bars + 2 * stage + v, (tma_parity & bit) ? 1u : 0u);
      tma_parity ^= bit;
      tma_pending &= ~bit;
    }
  };

  // Programmatic dependent launch: wait until the previous kernel has completed (and its writes
  // are visible) before reading any input. The next kernel is let in later, `pdl_lead` rounds
  // before the end of the main loop (griddepcontrol.launch_dependents there). Both are no-ops
  // when the launch did not opt in.
  auto wait_prior_grid = [] {
#ifdef NSA_SEL_HAS_CLUSTERS
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  };
  const int pro_tiles = kv_split ? stages : stages - 1;
  // EARLY: the ranges are read before the wait, speculatively (the previous kernel may still be
  // writing them), and turned into the prologue's token lists; right after the wait the
  // prologue's tiles go out at once (with Q in the first copy group), and warp 0 reads the
  // ranges again to check them while the tiles stream in. Where they differ, the block lets its
  // loads land and starts over from the ranges it read after the wait. No input but the
  // ranges and kv_lens is read before the wait, and nothing read then is used unchecked.
  bool plain = true;
  if constexpr (EARLY) {
    if (warp == 0) scan_ranges(false, true);
    __syncthreads();
    derive();
    for (int it = 0; it < pro_tiles; ++it)
      if (it < team_tiles) fill_tok(it);
    team_sync<TEAMS, Tr::kThreads>(team);
    wait_prior_grid();
    NSA_SEL_TRACE_MARK(1);
    for (int it = 0; it < pro_tiles; ++it) {
      if (it < team_tiles) issue_loads(it, it);
      if (it == 0) copy_q();
      cp_async_commit();
    }
    if (warp == 0) {
      const bool differs = scan_ranges(true, true);
      if (lane == 0) total_s[1] = differs || (tma_on & 2) != 0 ? 1 : 0;  // bit 1: tests
      NSA_SEL_TRACE_MARK(9);
    }
    __syncthreads();
    plain = total_s[1] != 0;  // block-uniform
    if (plain) {  // let every load land before the stages and token buffers are reused
      cp_async_wait<0>();
      for (int s = 0; s < stages; ++s) {
        wait_tma(s, 0);
        wait_tma(s, 1);
      }
      __syncthreads();
    }
    NSA_SEL_TRACE_MARK(2);
  } else {
    wait_prior_grid();
    NSA_SEL_TRACE_MARK(1);
  }
  if (plain) {
    if (warp == 0) {
      scan_ranges(false, false);
      NSA_SEL_TRACE_MARK(9);
    }
    copy_q();
    cp_async_commit();
    __syncthreads();
    NSA_SEL_TRACE_MARK(2);
    derive();
    // Prologue: the team's tiles 0 .. stages-2 in flight, tile i in stage i. With kv_split, K and
    // V are copy groups of their own (K0 V0 K1 V1 ... K(s-1)): the K of tile stages-1 too, so a
    // stage's K half is refilled as soon as QK^T has read it and its V half once PV has.
    for (int it = 0; it < pro_tiles; ++it)
      if (it < team_tiles) fill_tok(it, true);
    team_sync<TEAMS, Tr::kThreads>(team);
    if constexpr (kv_split) {
      for (int it = 0; it < stages; ++it) {
        if (it < team_tiles) issue_loads(it, it, true, false, true);
        cp_async_commit();
        if (it + 1 < stages) {
          if (it < team_tiles) issue_loads(it, it, false, true, true);
          cp_async_commit();
        }
      }
    } else {
      for (int it = 0; it < stages - 1; ++it) {
        if (it < team_tiles) issue_loads(it, it, true, true, true);
        cp_async_commit();
      }
    }
  }

  // Per-thread online-softmax state for rows (lane / 4) and (lane / 4 + 8) of this warp's m-tile.
  constexpr int kNB = Tr::kTokPerWarp / 8;  // n8 score blocks per warp and tile
  float o[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  int st_use = 0;            // stage of tile it
  int st_fill = stages - 1;  // stage of tile it + stages - 1

  const int lr = lane & 7;   // row within an 8x8 ldmatrix matrix
  const int lm = lane >> 3;  // which of the 4 matrices this lane addresses
  const int tok0 = slice * Tr::kTokPerWarp;

  // The warp's Q fragments (16 heads x DK) are the same for every tile: in the two-team kernel
  // (one block per SM, so registers to spare; at most 192 columns) they are loaded once instead
  // of per tile, which takes a third of the shared memory reads out of each tile's QK^T.
  // Measured (A/B on the H100 against the kernel without both, cold graph us, with the 4 QK
  // chains below): d128 B=16 17.0 against 17.3, nsa27b B=4 10.3 against 10.6, nsa27b B=16 and
  // m125 B=64 unchanged (warm nsa27b B=16 17.2 against 18.1); in the one-team kernel the same
  // change cost nsa27b B=1 (6.90 against 6.70) and seed D=64 B=1024 (51.1 against 50.5), so it
  // stays there as it was.
  constexpr bool kQInRegs = TEAMS > 1 && MT == 1 && DK <= 192;
  uint32_t q_frag[kQInRegs ? DK / 16 : 1][4];
  auto load_q = [&](int kk, uint32_t (&a)[4]) {
    ldmatrix_x4(
        a, smem_addr(q_s + swz(mt * 16 + lr + 8 * (lm & 1), 2 * kk + (lm >> 1), Tr::kChunksK)));
  };

  // The next kernel in the stream may start launching once every block has passed this round
  // (or exited): late enough that its blocks do not sit on free SMs for the whole of this
  // kernel (at nsa27b B=16 they waited 20 us), early enough to hide its launch. Measured on the
  // H100 against the trigger at entry (NOTES.md v11): nsa27b B=1 6.1 -> 5.9 us, d128 B=64
  // 52.3 -> 51.8; a lead of 1 or 4 rounds was slower than 2 at nsa27b B=16.
  const int trigger_round = rounds > pdl_lead ? rounds - pdl_lead : 0;
  for (int it = 0; it < rounds; ++it) {
#ifdef NSA_SEL_HAS_CLUSTERS
    if (it == trigger_round) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    // Token indices for tile it + stages - 1 go to a buffer nobody reads now (kTokBufs =
    // kStages + 1 > stages); the barrier then also guarantees every warp of the team finished
    // computing tile it - 1, whose K/V stage (st_fill) is refilled.
    const int nxt = it + stages - 1;
    if constexpr (kv_split) {
      // Groups in flight at the top: K up to tile it + stages - 1, V up to it + stages - 2.
      // The barrier says every warp finished PV of tile it - 1 (its V half, st_fill, is free)
      // and the softmax of tile it - 1 (so its token buffer may take tile it + stages).
      team_sync<TEAMS, Tr::kThreads>(team);
      if (nxt < team_tiles) issue_loads(nxt, st_fill, false, true);
      cp_async_commit();
      if (nxt + 1 < team_tiles) fill_tok(nxt + 1);
      cp_async_wait_rt(2 * stages - 1);  // K of tile it (V it, then K/V of it+1 .. may pend)
      wait_tma(st_use, 0);
    } else {
      if (nxt < team_tiles) fill_tok(nxt);
      team_sync<TEAMS, Tr::kThreads>(team);
      if (nxt < team_tiles) issue_loads(nxt, st_fill);
      cp_async_commit();
      cp_async_wait_rt(stages - 1);
      wait_tma(st_use, 0);
      wait_tma(st_use, 1);
    }
    team_sync<TEAMS, Tr::kThreads>(team);
    if (it == 0) NSA_SEL_TRACE_MARK(3);
    if (TEAMS > 1 && it >= team_tiles) continue;  // team-uniform; only in the last round
    if constexpr (kQInRegs) {
      if (it == 0) {  // Q landed with the first tile (its copy group is the oldest)
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) load_q(kk, q_frag[kk]);
      }
    }

    const unsigned char* k_st = kv_team + st_use * Tr::kTileBytes;
    const unsigned char* v_st = k_st + Tr::kKStageBytes;
    const int32_t* tok = tok_s + (it % Tr::kTokBufs) * Tr::kTile;
    const int st_this = st_use;
    st_use = st_use + 1 == stages ? 0 : st_use + 1;
    st_fill = st_fill + 1 == stages ? 0 : st_fill + 1;

    // S = Q K^T for 16 heads x kTokPerWarp tokens, in kChains accumulator sets (k step kk goes
    // to set kk % kChains) so the dependent mma chain is kChains times shorter: with one warp per
    // scheduler at small batch, that chain is the tile's latency. 4 sets in the two-team kernel
    // (see kQInRegs), 2 in the one-team kernel.
    constexpr int kChains = (TEAMS > 1 && kNB <= 2 && DK / 16 >= 4) ? 4 : 2;
    float s[kChains][kNB][4];
#pragma unroll
    for (int c = 0; c < kChains; ++c)
#pragma unroll
      for (int i = 0; i < kNB; ++i) s[c][i][0] = s[c][i][1] = s[c][i][2] = s[c][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t a_smem[4];
      if constexpr (!kQInRegs) load_q(kk, a_smem);
      const uint32_t (&a)[4] = kQInRegs ? q_frag[kQInRegs ? kk : 0] : a_smem;
#pragma unroll
      for (int nb2 = 0; nb2 < kNB / 2; ++nb2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(k_st + kv_off(tok0 + nb2 * 16 + lr + 8 * (lm >> 1),
                                                2 * kk + (lm & 1))));
        float (&acc)[kNB][4] = s[kk % kChains];
        mma16816<T>(acc[2 * nb2], a, kb[0], kb[1]);
        mma16816<T>(acc[2 * nb2 + 1], a, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int c = 1; c < kChains; ++c)
#pragma unroll
      for (int i = 0; i < kNB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][i][e] += s[c][i][e];

    float (&s0)[kNB][4] = s[0];
    // Online softmax (log2 domain). Positions past the selection are -inf, so their p is 0 and
    // their zero-filled V rows contribute exactly nothing.
#pragma unroll
    for (int i = 0; i < kNB; ++i) {
      const int col = tok0 + i * 8 + (lane & 3) * 2;
      const bool v0 = tok[col] >= 0, v1 = tok[col + 1] >= 0;
      s0[i][0] = v0 ? s0[i][0] * scale_log2 : -INFINITY;
      s0[i][1] = v1 ? s0[i][1] * scale_log2 : -INFINITY;
      s0[i][2] = v0 ? s0[i][2] * scale_log2 : -INFINITY;
      s0[i][3] = v1 ? s0[i][3] * scale_log2 : -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kNB; ++i) mx = fmaxf(mx, fmaxf(s0[i][2 * r], s0[i][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float ref = m_new == -INFINITY ? 0.f : m_new;  // empty so far: keep exact zeros
      const float alpha = fast_exp2(m_run[r] - ref);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNB; ++i) {
        s0[i][2 * r] = fast_exp2(s0[i][2 * r] - ref);
        s0[i][2 * r + 1] = fast_exp2(s0[i][2 * r + 1] - ref);
        sum += s0[i][2 * r] + s0[i][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int i = 0; i < DV / 8; ++i) {
        o[i][2 * r] *= alpha;
        o[i][2 * r + 1] *= alpha;
      }
    }

    if constexpr (kv_split) {
      // Every warp has read this stage's K half: refill it with tile it + stages, then wait
      // for this tile's V (the K of tile it + stages and the pairs in between may pend).
      team_sync<TEAMS, Tr::kThreads>(team);
      if (nxt + 1 < team_tiles) issue_loads(nxt + 1, st_this, true, false);
      cp_async_commit();
      cp_async_wait_rt(2 * stages - 1);
      wait_tma(st_this, 1);
      team_sync<TEAMS, Tr::kThreads>(team);
    }

    // O += P V: the score accumulators are already in the A-fragment layout of the next mma.
#pragma unroll
    for (int ks = 0; ks < Tr::kTokPerWarp / 16; ++ks) {
      uint32_t a[4];
      a[0] = pack2<T>(s0[2 * ks][0], s0[2 * ks][1]);
      a[1] = pack2<T>(s0[2 * ks][2], s0[2 * ks][3]);
      a[2] = pack2<T>(s0[2 * ks + 1][0], s0[2 * ks + 1][1]);
      a[3] = pack2<T>(s0[2 * ks + 1][2], s0[2 * ks + 1][3]);
#pragma unroll
      for (int dc = 0; dc < DV / 16; ++dc) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(v_st + kv_off(tok0 + ks * 16 + lr + 8 * (lm & 1),
                                                      2 * dc + (lm >> 1))));
        mma16816<T>(o[2 * dc], a, vb[0], vb[1]);
        mma16816<T>(o[2 * dc + 1], a, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();
  NSA_SEL_TRACE_MARK(4);

  // Row sums were per thread; a quad holds one row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  __syncthreads();  // K/V stages are free: reuse them for the merges
  NSA_SEL_TRACE_MARK(11);

  // State set `team * kSlices + slice` of the merge area: O [kHeads][kOStride], then m [kHeads],
  // then l [kHeads].
  float* merge_s = reinterpret_cast<float*>(kv_s);
  constexpr int kSets = TEAMS * Tr::kSlices;
  auto state_o = [&](int set) { return merge_s + set * (Tr::kStateBytes / 4); };
  auto state_m = [&](int set) { return state_o(set) + Tr::kHeads * Tr::kOStride; };
  auto state_l = [&](int set) { return state_m(set) + Tr::kHeads; };
  const int r0 = mt * 16 + (lane >> 2);  // this thread's first head row; the second is r0 + 8

  // Every warp publishes its (O, m, l); then the O rows are merged in parallel, each thread
  // weighing the sets of its head itself, set by set in order (deterministic).
  {
    const int set = team * Tr::kSlices + slice;
    float* os = state_o(set);
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) {
      const int col = i * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(os + r0 * Tr::kOStride + col) = make_float2(o[i][0], o[i][1]);
      *reinterpret_cast<float2*>(os + (r0 + 8) * Tr::kOStride + col) =
          make_float2(o[i][2], o[i][3]);
    }
    if ((lane & 3) == 0) {
      state_m(set)[r0] = m_run[0];
      state_m(set)[r0 + 8] = m_run[1];
      state_l(set)[r0] = l_run[0];
      state_l(set)[r0 + 8] = l_run[1];
    }
  }
  __syncthreads();
  NSA_SEL_TRACE_MARK(12);

  // Weights of the sets of head hr and the block's (m, l) of that head.
  auto slice_weights = [&](int hr, float (&w)[kSets], float& m_all, float& l_all) {
    m_all = -INFINITY;
#pragma unroll
    for (int k = 0; k < kSets; ++k) m_all = fmaxf(m_all, state_m(k)[hr]);
    const float ref = m_all == -INFINITY ? 0.f : m_all;  // all sets empty: weights 0
    l_all = 0.f;
#pragma unroll
    for (int k = 0; k < kSets; ++k) {
      w[k] = fast_exp2(state_m(k)[hr] - ref);
      l_all += w[k] * state_l(k)[hr];
    }
  };
  auto merge_group = [&](int hr, int c4, const float (&w)[kSets]) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int k = 0; k < kSets; ++k) {
      const float4 x = *reinterpret_cast<const float4*>(state_o(k) + hr * Tr::kOStride + c4);
      acc.x += w[k] * x.x;
      acc.y += w[k] * x.y;
      acc.z += w[k] * x.z;
      acc.w += w[k] * x.w;
    }
    return acc;
  };

  T* out_row = static_cast<T*>(p.out) + b * p.o_stride_b + g * p.o_stride_g;
  constexpr int kGroups = DV / 4;  // float4 column groups per head
  auto store4 = [&](int hr, int c4, float4 v) {
    T* dst = out_row + hr * p.o_stride_h + c4;
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
  };
  // The merge's work split: kTPH threads per head, each weighing the sets once and then merging
  // kGPT column groups (group msub + c * kTPH), all their loads in flight together: one dependent
  // chain per thread (it was one per group, up to 4 in a row), which the B=1 epilogue waits on.
  // (Past kGroups threads per head, the extra threads take heads >= kHeads: they have none.)
  constexpr int kTPH = nthreads / Tr::kHeads < kGroups ? nthreads / Tr::kHeads : kGroups;
  constexpr int kGPT = kGroups / kTPH;
  static_assert(kTPH >= 1 && kGroups % kTPH == 0, "the merge needs whole column groups per thread");
  const int mh = tid / kTPH, msub = tid % kTPH;
  float4 acc[kGPT];
  float m_blk = -INFINITY, l_blk = 0.f;
  if (mh < p.h) {
    float w[kSets];
    slice_weights(mh, w, m_blk, l_blk);
    if (splits == 1) {
      // Empty selection: l_blk == 0 and every O is 0, so weights 0 give exact zeros (never
      // 0/0). NaN in the selected data keeps propagating.
      const float inv = l_blk == 0.f ? 0.f : 1.f / l_blk;
#pragma unroll
      for (int k = 0; k < kSets; ++k) w[k] *= inv;
    }
#pragma unroll
    for (int c = 0; c < kGPT; ++c) acc[c] = merge_group(mh, (msub + c * kTPH) * 4, w);
  }

  if (splits == 1) {
    if (mh < p.h) {
#pragma unroll
      for (int c = 0; c < kGPT; ++c) store4(mh, (msub + c * kTPH) * 4, acc[c]);
    }
    NSA_SEL_TRACE_MARK(5);
    NSA_SEL_TRACE_MARK(6);
    return;
  }

#ifdef NSA_SEL_HAS_CLUSTERS
  // Split-KV combine across the cluster, by pushing: block `split` owns output columns
  // [split, split + 1) * DV / splits of every head. Each block sends its merged O of those
  // columns, and its (m, l) of every head, into the owner's receive area with st.async, whose
  // bytes complete the owner's mbarrier (set at the start to expect all of them). The owner waits
  // on that barrier alone (no cluster-wide barrier: it needs its data, not its peers' progress),
  // then weighs the splits' states of its columns in split order (deterministic) and stores.
  // Nobody reads a peer's memory, and a block exits only once everything sent to it has landed.
  float* recv_o =
      reinterpret_cast<float*>(smem + Tr::off_recv(stages, teams));  // [splits][kHeads][DV/splits]
  float* recv_ml = recv_o + Tr::kHeads * DV;                         // [splits][kHeads][2]
  const int share = kGroups / splits;  // column groups per owner (splits divides kGroups)
  NSA_SEL_TRACE_MARK(13);
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");  // every peer has started
  NSA_SEL_TRACE_MARK(5);
  if (mh < p.h) {
#pragma unroll
    for (int c = 0; c < kGPT; ++c) {
      const int cg4 = msub + c * kTPH;
      const int owner = cg4 / share, j = cg4 % share;
      const uint32_t bar = map_rank(recv_bar, owner);
      st_async(map_rank(recv_o + (split * Tr::kHeads + mh) * (share * 4) + j * 4, owner), acc[c],
               bar);
      if (j == 0)
        st_async(map_rank(recv_ml + (split * Tr::kHeads + mh) * 2, owner),
                 make_float2(m_blk, l_blk), bar);
    }
  }
  NSA_SEL_TRACE_MARK(14);
  mbar_wait_phase0_cluster(recv_bar);
  NSA_SEL_TRACE_MARK(7);
  const int my_groups = static_cast<int>(p.h) * share;
  // The states of splits k0 .. k0 + kCombineChunk - 1 for head hr, column group j of this
  // block's share: every load first, so that the lot costs one shared-memory latency (splits
  // past `splits`, and every split where !active, read as empty states).
  auto load_states = [&](int hr, int j, int k0, bool active, float2 (&ml)[kCombineChunk],
                         float4 (&x)[kCombineChunk]) {
#pragma unroll
    for (int kc = 0; kc < kCombineChunk; ++kc) {
      const int k = k0 + kc;
      const bool live = active && k < splits;
      ml[kc] = live ? *reinterpret_cast<const float2*>(recv_ml + (k * Tr::kHeads + hr) * 2)
                    : make_float2(-INFINITY, 0.f);
      x[kc] = live ? *reinterpret_cast<const float4*>(recv_o +
                                                      (k * Tr::kHeads + hr) * (share * 4) + j * 4)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  if constexpr (MT == 1) {
    // Two threads (adjacent lanes) per column group where splits > kCombineChunk, each weighing a
    // chunk of 8 splits as one state, which the pair then merges through a shuffle; one otherwise.
    // Every thread runs the same number of rounds, so the shuffle is warp-uniform.
    const int chunk_shift = splits > kCombineChunk ? 1 : 0;
    const int items = my_groups << chunk_shift;
    for (int base = 0; base < items; base += nthreads) {
      const int item = base + tid;
      const bool active = item < items;
      const int gi = item >> chunk_shift, k0 = (item & chunk_shift) * kCombineChunk;
      const int hr = gi / share, j = gi % share;
      float2 ml[kCombineChunk];
      float4 x[kCombineChunk];
      load_states(hr, j, k0, active, ml, x);
      float m_all = -INFINITY;
#pragma unroll
      for (int kc = 0; kc < kCombineChunk; ++kc) m_all = fmaxf(m_all, ml[kc].x);
      const float ref = m_all == -INFINITY ? 0.f : m_all;  // all splits empty: weights 0
      float l_all = 0.f;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int kc = 0; kc < kCombineChunk; ++kc) {
        if (k0 + kc < splits) {
          const float w = fast_exp2(ml[kc].x - ref);
          l_all += w * ml[kc].y;
          acc.x += w * x[kc].x;
          acc.y += w * x[kc].y;
          acc.z += w * x[kc].z;
          acc.w += w * x[kc].w;
        }
      }
      if (chunk_shift != 0) {
        // The pair's two chunk states, merged in the same order by both threads (a + b is b + a
        // exactly), so the thread of chunk 0 stores the same result either would.
        const float m2 = __shfl_xor_sync(0xffffffffu, m_all, 1);
        const float l2 = __shfl_xor_sync(0xffffffffu, l_all, 1);
        float4 a2;
        a2.x = __shfl_xor_sync(0xffffffffu, acc.x, 1);
        a2.y = __shfl_xor_sync(0xffffffffu, acc.y, 1);
        a2.z = __shfl_xor_sync(0xffffffffu, acc.z, 1);
        a2.w = __shfl_xor_sync(0xffffffffu, acc.w, 1);
        float w1, w2, mm;
        merge_weights(m_all, m2, w1, w2, mm);
        l_all = w1 * l_all + w2 * l2;
        acc.x = w1 * acc.x + w2 * a2.x;
        acc.y = w1 * acc.y + w2 * a2.y;
        acc.z = w1 * acc.z + w2 * a2.z;
        acc.w = w1 * acc.w + w2 * a2.w;
      }
      // Empty selection: l_all == 0 and every O is 0, so the coefficient 0 gives exact zeros.
      const float inv = l_all == 0.f ? 0.f : 1.f / l_all;
      acc.x *= inv;
      acc.y *= inv;
      acc.z *= inv;
      acc.w *= inv;
      if (active && (item & chunk_shift) == 0) store4(hr, (split * share + j) * 4, acc);
    }
  } else {
    // (Blocks of several m-tiles: at most kMaxSplitsMulti == kCombineChunk splits, one thread a
    // group. The pairs' loop above costs these kernels 40 registers, half their occupancy.)
    for (int gi = tid; gi < my_groups; gi += nthreads) {
      const int hr = gi / share, j = gi % share;
      float2 ml[kCombineChunk];
      float4 x[kCombineChunk];
      load_states(hr, j, 0, true, ml, x);
      float m_all = -INFINITY;
#pragma unroll
      for (int k = 0; k < kCombineChunk; ++k) m_all = fmaxf(m_all, ml[k].x);
      const float ref = m_all == -INFINITY ? 0.f : m_all;  // all splits empty: weights 0
      float w[kCombineChunk];
      float l_all = 0.f;
#pragma unroll
      for (int k = 0; k < kCombineChunk; ++k) {
        w[k] = fast_exp2(ml[k].x - ref);
        if (k < splits) l_all += w[k] * ml[k].y;
      }
      // Empty selection: l_all == 0 and every O is 0, so coefficients 0 give exact zeros.
      const float inv = l_all == 0.f ? 0.f : 1.f / l_all;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int k = 0; k < kCombineChunk; ++k) {
        if (k < splits) {
          const float c = w[k] * inv;
          acc.x += c * x[k].x;
          acc.y += c * x[k].y;
          acc.z += c * x[k].z;
          acc.w += c * x[k].w;
        }
      }
      store4(hr, (split * share + j) * 4, acc);
    }
  }
  NSA_SEL_TRACE_MARK(8);
  NSA_SEL_TRACE_MARK(6);
#endif
}

}  // namespace nsa_sel
