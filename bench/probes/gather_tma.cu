// Probe (tuning only, not part of the library): does the bulk tensor copy engine (TMA) read the
// nsa27b B=1 selection (4 rows x 16 blocks of 64 tokens, K 384 B + V 256 B per token) faster
// than cp.async? gather_cluster.cu measured cp.async at about 30-40 GB/s per SM whatever the
// thread count, the mark of a cap on one SM's loads in flight: a 40 KB tile per SM takes about
// 2 us to land. Here each block copies its share either with 16-byte cp.async (thread-issued,
// as the decode kernel does) or with one tensor copy per 64-column box of K and V (thread 0
// issues them, every thread waits on one mbarrier), and writes one word.
// Timing as in gather_cluster.cu: a CUDA graph of 64 launches on rotated selections of a 168 MB
// cache (L2 cold), programmatic dependent launch, median of 15 replays.
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o gather_tma bench/probes/gather_tma.cu -lcuda
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e = (x);                                                             \
    if (e != cudaSuccess) {                                                          \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)
#define CU(x)                                                   \
  do {                                                          \
    CUresult r = (x);                                           \
    if (r != CUDA_SUCCESS) {                                    \
      std::printf("%s:%d %s: %d\n", __FILE__, __LINE__, #x, r); \
      std::exit(1);                                             \
    }                                                           \
  } while (0)

constexpr int kG = 4, kN = 16, kSkv = 65536, kDk = 192, kDv = 128;
constexpr int kRowBytes = (kDk + kDv) * 2;  // 640

__device__ __forceinline__ uint32_t sa(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async version (as gather_cluster.cu).
__global__ void gather_cp(const uint16_t* __restrict__ K, const uint16_t* __restrict__ V,
                          const int32_t* __restrict__ blocks, int splits, int tok_per_block,
                          float* out) {
  extern __shared__ __align__(1024) unsigned char smem[];
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int t0 = split * tok_per_block;
  const int chunks_per_tok = kRowBytes / 16;
  const int total = tok_per_block * chunks_per_tok;
  for (int c = threadIdx.x; c < total; c += blockDim.x) {
    const int tl = c / chunks_per_tok, ch = c % chunks_per_tok;
    const int pos = t0 + tl;
    const int tok = blocks[row * kN + pos / 64] * 64 + pos % 64;
    const unsigned char* src =
        ch < 24 ? reinterpret_cast<const unsigned char*>(K + ((int64_t)row * kSkv + tok) * kDk) +
                      ch * 16
                : reinterpret_cast<const unsigned char*>(V + ((int64_t)row * kSkv + tok) * kDv) +
                      (ch - 24) * 16;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa(smem + c * 16)),
                 "l"(src));
  }
  asm volatile("cp.async.commit_group;\n");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0 && total > 0) out[blockIdx.x] = reinterpret_cast<float*>(smem)[7];
}

// Tensor-copy version: maps over K as [kG * kSkv rows][kDk] and V as [kG * kSkv][kDv], boxes of
// 64 columns x box_rows rows, 128-byte swizzle (the layout the decode kernel's ldmatrix wants).
__global__ void gather_tma(const __grid_constant__ CUtensorMap tk,
                           const __grid_constant__ CUtensorMap tv,
                           const int32_t* __restrict__ blocks, int splits, int tok_per_block,
                           int box_rows, float* out) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t bar;
  const uint32_t bar_a = sa(&bar);
  if (threadIdx.x == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(&tk) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(&tv) : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar_a) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int t0 = split * tok_per_block;
  const int bytes = tok_per_block * kRowBytes;
  if (threadIdx.x == 0 && tok_per_block > 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_a),
                 "r"(bytes)
                 : "memory");
    unsigned char* dst = smem;
    for (int r0 = 0; r0 < tok_per_block; r0 += box_rows) {
      const int pos = t0 + r0;
      const int tok = blocks[row * kN + pos / 64] * 64 + pos % 64;
      const int grow = row * kSkv + tok;
      for (int j = 0; j < kDk / 64; ++j, dst += box_rows * 128)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
            " [%0], [%1, {%2, %3}], [%4];" ::"r"(sa(dst)),
            "l"(&tk), "r"(j * 64), "r"(grow), "r"(bar_a)
            : "memory");
      for (int j = 0; j < kDv / 64; ++j, dst += box_rows * 128)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
            " [%0], [%1, {%2, %3}], [%4];" ::"r"(sa(dst)),
            "l"(&tv), "r"(j * 64), "r"(grow), "r"(bar_a)
            : "memory");
    }
  }
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (tok_per_block > 0) {
    uint32_t done = 0;
    do {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
          " selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar_a)
          : "memory");
    } while (!done);
  }
  if (threadIdx.x == 0 && tok_per_block > 0) out[blockIdx.x] = reinterpret_cast<float*>(smem)[7];
  if (threadIdx.x == 0) asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(bar_a) : "memory");
}

static CUtensorMap make_map(void* base, int cols, int rows, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
  cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  cuuint32_t estr[2] = {1, 1};
  CU(cuTensorMapEncodeTiled(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, dims, strides, box, estr,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
  return m;
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs\n", prop.name, sms);
  uint16_t *K, *V;
  CK(cudaMalloc(&K, (size_t)kG * kSkv * kDk * 2));
  CK(cudaMalloc(&V, (size_t)kG * kSkv * kDv * 2));
  CK(cudaMemset(K, 0, (size_t)kG * kSkv * kDk * 2));
  CK(cudaMemset(V, 0, (size_t)kG * kSkv * kDv * 2));
  constexpr int kCalls = 64;
  std::mt19937 rng(1);
  std::vector<int32_t> h_blocks(kCalls * kG * kN);
  std::vector<int> perm(kSkv / 64);
  for (int c = 0; c < kCalls * kG; ++c) {
    for (int i = 0; i < (int)perm.size(); ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::sort(perm.begin(), perm.begin() + kN);
    std::copy(perm.begin(), perm.begin() + kN, h_blocks.begin() + c * kN);
  }
  int32_t* d_blocks;
  CK(cudaMalloc(&d_blocks, h_blocks.size() * 4));
  CK(cudaMemcpy(d_blocks, h_blocks.data(), h_blocks.size() * 4, cudaMemcpyHostToDevice));
  float* out;
  CK(cudaMalloc(&out, 4096 * 4));
  CK(cudaFuncSetAttribute(gather_cp, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CK(cudaFuncSetAttribute(gather_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  struct Cfg {
    bool tma;
    int splits, threads;
  };
  const Cfg cfgs[] = {{false, 16, 128}, {true, 16, 128}, {false, 16, 256}, {false, 8, 128},
                      {true, 8, 128},   {false, 32, 128}, {true, 32, 128}, {false, 4, 128},
                      {true, 4, 128}};
  for (int pass = 0; pass < 2; ++pass) {
    for (const Cfg& c : cfgs) {
      const int tpb = kN * 64 / c.splits;
      const int box_rows = tpb < 64 ? tpb : 64;
      const CUtensorMap tk = make_map(K, kDk, kG * kSkv, box_rows);
      const CUtensorMap tv = make_map(V, kDv, kG * kSkv, box_rows);
      const int blocks = kG * c.splits;
      const int smem = tpb * kRowBytes + (c.tma ? 1024 : 0);
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(blocks);
      cfg.blockDim = dim3(c.threads);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = st;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      auto launch = [&](int call) {
        const int32_t* bl = d_blocks + (call % kCalls) * kG * kN;
        if (c.tma)
          return cudaLaunchKernelEx(&cfg, gather_tma, tk, tv, bl, c.splits, tpb, box_rows, out);
        return cudaLaunchKernelEx(&cfg, gather_cp, (const uint16_t*)K, (const uint16_t*)V, bl,
                                  c.splits, tpb, out);
      };
      for (int i = 0; i < kCalls; ++i) CK(launch(i));
      CK(cudaStreamSynchronize(st));
      CK(cudaGetLastError());
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < kCalls; ++i) CK(launch(i));
      CK(cudaStreamEndCapture(st, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, st));
      CK(cudaStreamSynchronize(st));
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0));
      CK(cudaEventCreate(&e1));
      std::vector<float> t;
      for (int r = 0; r < 15; ++r) {
        CK(cudaEventRecord(e0, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms * 1000.f / kCalls);
      }
      std::sort(t.begin(), t.end());
      std::printf("pass %d  %-8s blocks %3d (splits %2d) x %3d thr  %4d tok/block (%6d B)  %.2f us\n",
                  pass, c.tma ? "tma" : "cp.async", blocks, c.splits, c.threads, tpb,
                  tpb * kRowBytes, t[t.size() / 2]);
      CK(cudaGraphExecDestroy(ge));
      CK(cudaGraphDestroy(g));
    }
  }
  return 0;
}
