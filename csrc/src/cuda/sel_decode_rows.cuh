// Row-persistent decode kernel: for shapes with more (b, g) rows than resident blocks, where the
// one-block-per-row kernel runs in waves and every row pays a block's start-up (launch, ranges
// read, Q load, first-tile latency) with the K/V stream of that block drained.
//
// Grid:  P blocks (at most the resident capacity); block i takes rows i, i + P, i + 2P, ... in
//        order, a static assignment, so each row is still computed by one block in a fixed order
//        and the output is bitwise the same run to run.
// Block: one team of 4 warps, h <= 16 heads (one m-tile); warp w owns token slice w of each tile.
//
// The block's rows form one stream of 64-token tiles (a row of no selected token contributes one
// fully masked tile, so that its output is still written: zeros). The cp.async pipeline runs
// across row boundaries: the next row's ranges are read into registers a row ahead and scanned
// when the fill cursor enters it, and its Q is loaded with its first tile into a ring of Q
// buffers. At the end of a row the warps' states are merged in the K/V stage of the tile just
// consumed (free until the next iteration refills it), while the next row's first tiles are in
// flight, and the row's output is stored.
#pragma once

#include "sel_decode_kernel.cuh"

namespace nsa_sel {

template <typename T, int DK, int DV>
struct RowsTraits {
  using Tr = DecodeTraits<T, DK, DV, 1>;
  // Rows of at most this many ranges (the ring of scanned ranges holds `stages` rows).
  static constexpr int kMaxRanges = 64;
  static_assert(Tr::kSlices * Tr::kHeads * DV * 4 <= Tr::kTileBytes,
                "the merge of a row's warp states must fit in one K/V stage");
  __host__ __device__ static constexpr int off_kv(int stages) { return stages * Tr::kQBytes; }
  __host__ __device__ static constexpr int off_tok(int stages) {
    return off_kv(stages) + stages * Tr::kTileBytes;
  }
  // (m, l) of each warp and head at a row's end: [kSlices][kHeads] float2.
  __host__ __device__ static constexpr int off_ml(int stages) {
    return off_tok(stages) + Tr::kTokBufs * Tr::kTile * 4;
  }
  // Scanned ranges, per ring slot: exclusive prefix [n], start - prefix [n]; then the totals.
  __host__ __device__ static constexpr int off_ranges(int stages) {
    return off_ml(stages) + Tr::kSlices * Tr::kHeads * 8;
  }
  __host__ __device__ static constexpr int smem_bytes(int64_t n, int stages) {
    return off_ranges(stages) + stages * (2 * static_cast<int>(n) + 1) * 4 + 16;
  }
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(DecodeTraits<T, DK, DV, 1>::kThreads)
    sel_decode_rows_kernel(const NsaSelParams p, const float scale_log2, const int stages,
                           unsigned long long* trace) {
  using Tr = DecodeTraits<T, DK, DV, 1>;
  using Rt = RowsTraits<T, DK, DV>;
  constexpr int nthreads = Tr::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;  // = token slice (one m-tile)
  unsigned char* q_ring = smem;
  unsigned char* kv_s = smem + Rt::off_kv(stages);
  int32_t* tok_s = reinterpret_cast<int32_t*>(smem + Rt::off_tok(stages));  // [kTokBufs][64]
  float2* ml_s = reinterpret_cast<float2*>(smem + Rt::off_ml(stages));
  const int n_ranges = static_cast<int>(p.n);
  int32_t* rng_s = reinterpret_cast<int32_t*>(smem + Rt::off_ranges(stages));  // [stages][2n]
  int32_t* tot_s = rng_s + stages * 2 * n_ranges;                               // [stages]

  unsigned long long* trace_rec =
      trace != nullptr && blockIdx.x < kTraceMaxBlocks ? trace + blockIdx.x * kTraceWords : nullptr;
  (void)trace_rec;
  NSA_SEL_TRACE_MARK(0);

  const int64_t rows = p.b * p.g;
  const int64_t grid = gridDim.x;
  const int my_rows = static_cast<int>((rows - blockIdx.x + grid - 1) / grid);  // >= 1
  const unsigned char* r_base = static_cast<const unsigned char*>(p.ranges);
  auto row_of = [&](int j) { return static_cast<int64_t>(blockIdx.x) + j * grid; };
  auto q_of = [&](int64_t row) {
    return static_cast<const T*>(p.q) + (row / p.g) * p.q_stride_b + (row % p.g) * p.q_stride_g;
  };
  auto r_of = [&](int64_t row) { return (row / p.g) * p.r_stride_b + (row % p.g) * p.r_stride_g; };

  // Warm L2 with the first two rows' ranges and Q before the wait for the previous kernel (a
  // prefetch reads nothing into the program), as the one-block-per-row kernel does.
  {
    const int es = p.index_type == NSA_SEL_I64 ? 8 : 4;
    const int n_pf = n_ranges < 64 ? n_ranges : 64;
    constexpr int kLines = (DK * 2 + 127) / 128;
    const int q_lines = static_cast<int>(p.h) * kLines;
    for (int j = 0; j < 2 && j < my_rows; ++j) {
      const int64_t row = row_of(j);
      if (tid < n_pf) prefetch_l2(r_base + (r_of(row) + tid * p.r_stride_n) * es);
      const T* q_row = q_of(row);
      for (int c = tid; c < q_lines; c += nthreads)
        prefetch_l2(q_row + (c / kLines) * p.q_stride_h + (c % kLines) * 64);
    }
  }
#ifdef NSA_SEL_HAS_CLUSTERS
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  NSA_SEL_TRACE_MARK(1);

  // Warp 0 reads a row's first 32 ranges and its kv_lens entry into registers a row ahead
  // (prefetch_row), and scans them into the row's ring slot when the fill cursor reaches the row
  // (scan_row); ranges past the first 32 are read there.
  int64_t pf_s = 0, pf_e = 0, pf_lim = p.s_kv;
  auto prefetch_row = [&](int j) {
    const int64_t row = row_of(j);
    const int64_t r_row = r_of(row);
    if (lane < n_ranges) {
      const int64_t off = r_row + lane * p.r_stride_n;
      pf_s = load_idx(r_base, p.index_type, off);
      pf_e = load_idx(r_base, p.index_type, off + p.r_stride_e);
    }
    pf_lim = p.kv_lens != nullptr
                 ? load_idx(p.kv_lens, p.kv_lens_type, (row / p.g) * p.kv_lens_stride_b)
                 : p.s_kv;
  };
  auto scan_row = [&](int j) {
    const int64_t r_row = r_of(row_of(j));
    int32_t* excl = rng_s + (j % stages) * 2 * n_ranges;
    int32_t* key = excl + n_ranges;
    // Causal limit of the single query: kv_len, clamped into [0, s_kv].
    const int64_t lim = pf_lim < 0 ? 0 : (pf_lim > p.s_kv ? p.s_kv : pf_lim);
    int carry = 0;
    for (int base = 0; base < n_ranges; base += 32) {
      const int i = base + lane;
      int len = 0, start = 0;
      if (i < n_ranges) {
        int64_t s0 = pf_s, e0 = pf_e;
        if (base > 0) {
          const int64_t off = r_row + i * p.r_stride_n;
          s0 = load_idx(r_base, p.index_type, off);
          e0 = load_idx(r_base, p.index_type, off + p.r_stride_e);
        }
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
      if (i < n_ranges) {
        excl[i] = carry + incl - len;
        key[i] = start - (carry + incl - len);
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) tot_s[j % stages] = carry;
  };
  // Tiles of ring slot `slot`'s row: at least one (an empty row's masked tile writes its zeros).
  auto tiles_of = [&](int slot) {
    const int total = tot_s[slot];
    return total > 0 ? (total + Tr::kTile - 1) / Tr::kTile : 1;
  };

  if (warp == 0) {
    prefetch_row(0);
    scan_row(0);
    if (my_rows > 1) prefetch_row(1);
  }
  __syncthreads();
  NSA_SEL_TRACE_MARK(2);

  // Fill cursor: the next tile to load is tile f_t of the block's row f_j (of f_nt tiles).
  int f_j = 0, f_t = 0, f_nt = tiles_of(0);
  bool f_done = false;
  int64_t f_row = row_of(0);
  const T* f_k = static_cast<const T*>(p.k) + (f_row / p.g) * p.k_stride_b +
                 (f_row % p.g) * p.k_stride_g;
  const T* f_v = static_cast<const T*>(p.v) + (f_row / p.g) * p.v_stride_b +
                 (f_row % p.g) * p.v_stride_g;

  constexpr int kRowsPerPass = Tr::kThreads / 8;
  const int ld_row = tid >> 3;
  const int ld_col = ((tid & 7) ^ (ld_row & 7)) * 16;
  // One step of the fill side for virtual tile q (K/V stage q % stages): scan the row the cursor
  // enters, token indices, barrier, then the copies (with the row's Q at its first tile), one
  // commit group whether or not a tile was left. The barrier also guarantees that every warp has
  // finished the tile that last used the stage and the Q slot being refilled.
  auto fill_step = [&](int q) {
    if (!f_done && f_t == 0 && f_j > 0) {  // entering row f_j: its ranges
      if (warp == 0) {
        scan_row(f_j);
        if (f_j + 1 < my_rows) prefetch_row(f_j + 1);
      }
      __syncthreads();
      f_nt = tiles_of(f_j % stages);
    }
    int32_t* tok = tok_s + (q % Tr::kTokBufs) * Tr::kTile;
    if (!f_done && tid < Tr::kTile) {
      const int32_t* excl = rng_s + (f_j % stages) * 2 * n_ranges;
      const int32_t* key = excl + n_ranges;
      const int total = tot_s[f_j % stages];
      const int pos = f_t * Tr::kTile + tid;
      int t = -1;
      if (pos < total) {
        int lo = 0, hi = n_ranges;  // the last range starting <= pos
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (excl[mid] <= pos)
            lo = mid + 1;
          else
            hi = mid;
        }
        t = key[lo - 1] + pos;
      }
      tok[tid] = t;
    }
    __syncthreads();
    if (!f_done) {
      if (f_t == 0) {  // the row's Q into its ring slot, in the group of its first tile
        unsigned char* q_s = q_ring + (f_j % stages) * Tr::kQBytes;
        const T* q_row = q_of(f_row);
        for (int c = tid; c < Tr::kHeads * (DK / 8); c += nthreads) {
          const int hh = c / (DK / 8), ch = c % (DK / 8);
          const bool valid = hh < p.h;
          const T* src = valid ? q_row + hh * p.q_stride_h + ch * 8 : q_row;
          cp_async16(q_s + swz(hh, ch, Tr::kChunksK), src, valid);
        }
      }
      unsigned char* k_st = kv_s + (q % stages) * Tr::kTileBytes;
      unsigned char* v_st = k_st + Tr::kKStageBytes;
#pragma unroll
      for (int pass = 0; pass < Tr::kTile / kRowsPerPass; ++pass) {
        const int r = ld_row + pass * kRowsPerPass;
        const int t = tok[r];
        const bool valid = t >= 0;
        const T* k_src = f_k + (valid ? static_cast<int64_t>(t) * p.k_stride_t : 0) + (tid & 7) * 8;
        const T* v_src = f_v + (valid ? static_cast<int64_t>(t) * p.v_stride_t : 0) + (tid & 7) * 8;
        unsigned char* k_dst = k_st + r * (DK * 2) + ld_col;
        unsigned char* v_dst = v_st + r * (DV * 2) + ld_col;
#pragma unroll
        for (int jj = 0; jj < Tr::kChunksK / 8; ++jj)
          cp_async16(k_dst + jj * 128, k_src + jj * 64, valid);
#pragma unroll
        for (int jj = 0; jj < Tr::kChunksV / 8; ++jj)
          cp_async16(v_dst + jj * 128, v_src + jj * 64, valid);
      }
      if (++f_t == f_nt) {
        f_t = 0;
        if (++f_j == my_rows) {
          f_done = true;
#ifdef NSA_SEL_HAS_CLUSTERS
          // Nothing left to load: let the next kernel in the stream start launching.
          asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
        } else {
          f_row = row_of(f_j);
          f_k = static_cast<const T*>(p.k) + (f_row / p.g) * p.k_stride_b +
                (f_row % p.g) * p.k_stride_g;
          f_v = static_cast<const T*>(p.v) + (f_row / p.g) * p.v_stride_b +
                (f_row % p.g) * p.v_stride_g;
        }
      }
    }
    cp_async_commit();
  };

  constexpr int kNB = Tr::kTokPerWarp / 8;
  float o[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int q = 0; q < stages - 1; ++q) fill_step(q);

  const int lr = lane & 7;
  const int lm = lane >> 3;
  const int tok0 = warp * Tr::kTokPerWarp;
  const int r0 = lane >> 2;  // this thread's first head row; the second is r0 + 8
  constexpr int kTPH = nthreads / Tr::kHeads;  // merge: threads per head
  constexpr int kGroups = DV / 4;
  constexpr int kGPT = kGroups / kTPH;
  static_assert(kTPH >= 1 && kGroups % kTPH == 0, "the merge needs whole column groups per thread");
  const int mh = tid / kTPH, msub = tid % kTPH;

  // Compute cursor: tile c_t of the block's row c_j (of c_nt tiles).
  int c_j = 0, c_t = 0, c_nt = tiles_of(0);
  for (int it = 0; c_j < my_rows; ++it) {
    fill_step(it + stages - 1);
    cp_async_wait_rt(stages - 1);
    __syncthreads();
    if (it == 0) NSA_SEL_TRACE_MARK(3);

    const int st = it % stages;
    const unsigned char* k_st = kv_s + st * Tr::kTileBytes;
    const unsigned char* v_st = k_st + Tr::kKStageBytes;
    const unsigned char* q_s = q_ring + (c_j % stages) * Tr::kQBytes;
    const int32_t* tok = tok_s + (it % Tr::kTokBufs) * Tr::kTile;

    float s[2][kNB][4];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int i = 0; i < kNB; ++i) s[c][i][0] = s[c][i][1] = s[c][i][2] = s[c][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(q_s + swz(lr + 8 * (lm & 1), 2 * kk + (lm >> 1), Tr::kChunksK)));
#pragma unroll
      for (int nb2 = 0; nb2 < kNB / 2; ++nb2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(k_st + swz(tok0 + nb2 * 16 + lr + 8 * (lm >> 1),
                                             2 * kk + (lm & 1), Tr::kChunksK)));
        float (&acc)[kNB][4] = s[kk % 2];
        mma16816<T>(acc[2 * nb2], a, kb[0], kb[1]);
        mma16816<T>(acc[2 * nb2 + 1], a, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < kNB; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][i][e] += s[1][i][e];

    float (&s0)[kNB][4] = s[0];
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
      const float ref = m_new == -INFINITY ? 0.f : m_new;
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
        ldmatrix_x4_trans(vb, smem_addr(v_st + swz(tok0 + ks * 16 + lr + 8 * (lm & 1),
                                                   2 * dc + (lm >> 1), Tr::kChunksV)));
        mma16816<T>(o[2 * dc], a, vb[0], vb[1]);
        mma16816<T>(o[2 * dc + 1], a, vb[2], vb[3]);
      }
    }

    if (++c_t < c_nt) continue;

    // ---- End of row c_j: merge the 4 warps' states in this tile's stage and store. ----------
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
    __syncthreads();  // every warp is done with this stage: it holds the merge until refilled
    // O of set (warp) w: [kHeads][DV] fp32 with the 8-column blocks of row r XOR-swizzled by
    // r % 8, so that the publish's 8 rows and the merge's float4 reads spread over the banks.
    float* mo = reinterpret_cast<float*>(kv_s + st * Tr::kTileBytes);
    {
      float* os = mo + warp * Tr::kHeads * DV;
      const int sw = (r0 & 7) << 3;
#pragma unroll
      for (int i = 0; i < DV / 8; ++i) {
        const int col = (i * 8 + (lane & 3) * 2) ^ sw;
        *reinterpret_cast<float2*>(os + r0 * DV + col) = make_float2(o[i][0], o[i][1]);
        *reinterpret_cast<float2*>(os + (r0 + 8) * DV + col) = make_float2(o[i][2], o[i][3]);
      }
      if ((lane & 3) == 0) {
        ml_s[warp * Tr::kHeads + r0] = make_float2(m_run[0], l_run[0]);
        ml_s[warp * Tr::kHeads + r0 + 8] = make_float2(m_run[1], l_run[1]);
      }
    }
    __syncthreads();
    if (mh < p.h) {
      float w[Tr::kSlices];
      float m_all = -INFINITY;
#pragma unroll
      for (int k = 0; k < Tr::kSlices; ++k) m_all = fmaxf(m_all, ml_s[k * Tr::kHeads + mh].x);
      const float ref = m_all == -INFINITY ? 0.f : m_all;  // all sets empty: weights 0
      float l_all = 0.f;
#pragma unroll
      for (int k = 0; k < Tr::kSlices; ++k) {
        const float2 ml = ml_s[k * Tr::kHeads + mh];
        w[k] = fast_exp2(ml.x - ref);
        l_all += w[k] * ml.y;
      }
      // Empty selection: l_all == 0 and every O is 0, so weights 0 give exact zeros.
      const float inv = l_all == 0.f ? 0.f : 1.f / l_all;
#pragma unroll
      for (int k = 0; k < Tr::kSlices; ++k) w[k] *= inv;
      const int64_t row = row_of(c_j);
      T* out_row = static_cast<T*>(p.out) + (row / p.g) * p.o_stride_b +
                   (row % p.g) * p.o_stride_g + mh * p.o_stride_h;
      const int sw = (mh & 7) << 3;
#pragma unroll
      for (int c = 0; c < kGPT; ++c) {
        const int c4 = (msub + c * kTPH) * 4;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int k = 0; k < Tr::kSlices; ++k) {
          const float4 x =
              *reinterpret_cast<const float4*>(mo + (k * Tr::kHeads + mh) * DV + (c4 ^ sw));
          acc.x += w[k] * x.x;
          acc.y += w[k] * x.y;
          acc.z += w[k] * x.z;
          acc.w += w[k] * x.w;
        }
        *reinterpret_cast<uint2*>(out_row + c4) =
            make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
      }
    }
    // The next iteration's fill refills this stage only after its barrier, so the merge reads
    // above are done by then; ml_s is rewritten only at the next row's end.
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.f;
    c_t = 0;
    if (++c_j < my_rows) c_nt = tiles_of(c_j % stages);
  }
  cp_async_wait<0>();
  NSA_SEL_TRACE_MARK(4);
  NSA_SEL_TRACE_MARK(5);
  NSA_SEL_TRACE_MARK(6);
}

}  // namespace nsa_sel
