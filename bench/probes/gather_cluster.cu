// Probe (tuning only, not part of the library): what does reading the nsa27b B=1 selection
// (4 rows x 16 blocks of 64 tokens, K 384 B + V 256 B per token) cost in one launch, as a function
// of how many blocks share it and of the thread block cluster size they are launched in?
// Each block copies its share of the selected rows into shared memory with cp.async (all in
// flight at once, as the decode kernel's pipeline does at B=1), waits, and writes one word.
// Timing: a CUDA graph of 64 launches, each on a different random selection of a 168 MB cache
// (so L2 is cold), programmatic dependent launch as in the library; median of 15 replays.
//   nvcc -O3 -arch=sm_90a -o gather_cluster bench/probes/gather_cluster.cu && ./gather_cluster
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
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

constexpr int kG = 4, kN = 16, kSkv = 65536, kDk = 192, kDv = 128;
constexpr int kRowBytes = (kDk + kDv) * 2;  // 640

__global__ void gather(const uint16_t* __restrict__ K, const uint16_t* __restrict__ V,
                       const int32_t* __restrict__ blocks, int splits, int tok_per_block,
                       float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int t0 = split * tok_per_block;
  const int chunks_per_tok = kRowBytes / 16;  // 40: 24 of K, 16 of V
  const int total = tok_per_block * chunks_per_tok;
  // (A version that first copied the row's block table to shared memory and then issued the K
  // chunks before the V chunks measured 6.7 us for 32 blocks of 128 threads against 3.8 for this
  // one: at one warp per scheduler, how the copies are issued matters as much as the bytes.)
  for (int c = threadIdx.x; c < total; c += blockDim.x) {
    const int tl = c / chunks_per_tok, ch = c % chunks_per_tok;
    const int pos = t0 + tl;
    const int tok = blocks[row * kN + pos / 64] * 64 + pos % 64;
    const unsigned char* src =
        ch < 24 ? reinterpret_cast<const unsigned char*>(K + ((int64_t)row * kSkv + tok) * kDk) +
                      ch * 16
                : reinterpret_cast<const unsigned char*>(V + ((int64_t)row * kSkv + tok) * kDv) +
                      (ch - 24) * 16;
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem + c * 16));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
  }
  asm volatile("cp.async.commit_group;\n");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0 && total > 0) out[blockIdx.x] = reinterpret_cast<float*>(smem)[7];
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
  CK(cudaFuncSetAttribute(gather, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CK(cudaFuncSetAttribute(gather, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  struct Cfg {
    int splits, cluster, tok, threads;  // tok < 0: all the row's tokens split evenly
  };
  const Cfg cfgs[] = {{8, 8, -1, 128},   {8, 8, -1, 256},  {8, 8, -1, 512},  {8, 1, -1, 128},
                      {16, 16, -1, 128}, {16, 8, -1, 128}, {16, 8, -1, 256}, {16, 1, -1, 128},
                      {32, 1, -1, 128},  {32, 8, -1, 128}, {4, 4, -1, 128},  {4, 4, -1, 512},
                      {8, 8, 0, 128},    {16, 16, 0, 128}};
  for (int pass = 0; pass < 2; ++pass) {
    for (const Cfg& c : cfgs) {
      const int tpb = c.tok < 0 ? kN * 64 / c.splits : c.tok;
      const int blocks = kG * c.splits;
      const int smem = std::max(16, tpb * kRowBytes);
      cudaLaunchAttribute attr[2];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = c.cluster;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[1].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(blocks);
      cfg.blockDim = dim3(c.threads);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = st;
      cfg.attrs = attr;
      cfg.numAttrs = 2;
      auto launch = [&](int call) {
        return cudaLaunchKernelEx(&cfg, gather, (const uint16_t*)K, (const uint16_t*)V,
                                  (const int32_t*)(d_blocks + (call % kCalls) * kG * kN),
                                  c.splits, tpb, out);
      };
      for (int i = 0; i < kCalls; ++i) CK(launch(i));
      CK(cudaStreamSynchronize(st));
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
      std::printf(
          "pass %d  blocks %3d (splits %2d) x %3d thr  cluster %2d  %4d tok/block (%6d B)  %.2f us\n",
          pass, blocks, c.splits, c.threads, c.cluster, tpb, tpb * kRowBytes, t[t.size() / 2]);
      CK(cudaGraphExecDestroy(ge));
      CK(cudaGraphDestroy(g));
    }
  }
  return 0;
}
