#pragma once
// Grouped expert GEMM kernels shared by moe_gemm.cu (dense weights) and moe_gemm_mxfp4.cu (MXFP4
// weights): out[r] = act(W_e @ a[row_index[r]] + b_e) for grouped row r of expert e.
//
// Rows are grouped by expert (offsets from moe_dispatch). A one-block schedule kernel
// (moe_schedule_kernel) sanitizes the offsets and counts each expert's row tiles; the GEMM kernels
// are persistent (grid = a few CTAs per SM) and walk a linear tile index t -> (row tile rt, column
// tile ct = t % n_col_tiles), finding rt's expert by binary search over tile_start. Consecutive
// CTAs share the row tile and sweep the expert's weight columns, so the gathered activation rows
// stay in L2.
//
// Tensor-core kernel (bfloat16/float16, K % 8 == 0, 16-byte aligned operands): CTA tile 128 grouped
// rows x 128 weight rows (output columns) x 32 k, 8 warps as 2 x 4 (warp tile 64 x 32), mma.sync
// m16n8k16 with fp32 accumulators, 4-stage shared-memory ring. The A tile (activations) is gathered
// row by row with cp.async (the row pointer comes from row_index), the B tile comes from a source
// policy: DenseB (cp.async of W rows) or an MXFP4 decoder (moe_gemm_mxfp4.cu: global -> registers
// before the tile's math, decode -> shared memory after it). Both tiles are stored [row][32] with
// the 16-byte chunk index XOR-swizzled by (row / 2) % 4, so ldmatrix reads 8 rows without bank
// conflicts. Epilogue in registers: bias, then the SwiGLU of each interleaved column pair (in one
// thread: accumulator elements 0/1 are columns 2t, 2t+1), one rounding to the output dtype.
//
// SIMT kernel (float64, float32, and any shape the tensor-core kernel does not take): 64 x 64 x 16
// tiles, 256 threads with 4 x 4 outputs each, accumulation in acc_t<T>; the same schedule and
// epilogue. Its B source is a policy too (dense W forward, dense W for the dX GEMM of the
// backward, MXFP4).
//
// Bad-input behaviour (a device kernel cannot raise): a grouped row whose row_index is outside
// [0, R) is written as NaN; offsets are sanitized so that no expert reads or writes outside its
// rows; rows owned by no expert are NaN (moe_schedule_kernel).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "cuda/moe_common.cuh"
#include "cuda/utils.cuh"

namespace gptoss::cuda {

// One grouped GEMM: out[r, :ncols] = A[row(r), :red] @ B_e[:red, :ncols] (+ bias_e), row(r) =
// row_index[r] (or r), for grouped rows r of expert e in [so[e], so[e+1]).
template <typename T, typename A>
struct GemmParams {
  const T* a = nullptr;                // [a_rows, red] contiguous
  const int32_t* row_index = nullptr;  // [n_rows] or null (identity, then a_rows = n_rows)
  int64_t a_rows = 0;
  const int32_t* so = nullptr;          // sanitized offsets [E+1]
  const int32_t* tile_start = nullptr;  // [E+1], for the kernel's row tile
  int num_experts = 0;
  int64_t n_rows = 0;  // N
  int64_t red = 0;     // reduction length (K forward, M for the dX GEMM)
  int64_t ncols = 0;   // output columns before the activation (M forward, K for dX)
  const T* bias = nullptr;  // [E, ncols] or null
  void* out = nullptr;      // [N, ncols] (or [N, ncols/2] with the fused SwiGLU)
  A alpha = 0, limit = 0;   // SwiGLU
};

// The forward GEMMs' parameters (dense and MXFP4): x [a_rows, red] with row_index (or null),
// bias [E, ncols] (or null) and out; the schedule fields (so, tile_start) are left to the caller.
template <typename T, typename A>
GemmParams<T, A> forward_params(const at::Tensor& x, const at::Tensor* ri, int64_t num_experts, int64_t n_rows,
                                int64_t red, int64_t ncols, const at::Tensor* bias, at::Tensor& out, double alpha,
                                double limit) {
  GemmParams<T, A> p;
  p.a = x.const_data_ptr<T>();
  p.row_index = ri != nullptr ? ri->const_data_ptr<int32_t>() : nullptr;
  p.a_rows = x.size(0);
  p.num_experts = static_cast<int>(num_experts);
  p.n_rows = n_rows;
  p.red = red;
  p.ncols = ncols;
  p.bias = bias != nullptr ? bias->const_data_ptr<T>() : nullptr;
  p.out = out.mutable_data_ptr<T>();
  p.alpha = static_cast<A>(alpha);
  p.limit = static_cast<A>(limit);
  return p;
}

// Source row of grouped row gr, or -1 when row_index holds a value outside [0, a_rows).
__device__ __forceinline__ int64_t gemm_src_row(const int32_t* __restrict__ row_index, int64_t gr, int64_t a_rows) {
  const int64_t r = row_index != nullptr ? static_cast<int64_t>(row_index[gr]) : gr;
  return r >= 0 && r < a_rows ? r : -1;
}

// ============================================================================ tensor-core path

constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kTcStages = 4, kTcThreads = 256;
constexpr int kTcTileBytes = kTcBM * kTcBK * 2;           // one operand, one stage: 8 KB
constexpr int kTcSmem = 2 * kTcStages * kTcTileBytes;      // 64 KB (dynamic, opt-in)
static_assert(kTcBM == kTcBN, "the A and B tiles share the [128][32] layout");

// Byte offset of 16-byte chunk kc (0..3) of row r (0..127) in a [128][32] b16 tile.
__device__ __forceinline__ uint32_t tc_swz(int r, int kc) {
  return static_cast<uint32_t>(r * 64 + ((kc ^ ((r >> 1) & 3)) << 4));
}

// B source: dense weight [E, ncols, red] (rows of W are the columns of the output), cp.async.
// Thread tid copies chunk kc = tid % 4 of tile rows tid / 4 and tid / 4 + 64.
template <typename T>
struct DenseB {
  const T* w = nullptr;
  int64_t ncols = 0, red = 0;
  // per tile
  const T* rowp[2] = {nullptr, nullptr};

  __device__ __forceinline__ void begin_tile(int e, int64_t n0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t n = n0 + (tid >> 2) + 64 * i;
      rowp[i] = n < ncols ? w + (static_cast<int64_t>(e) * ncols + n) * red : nullptr;
    }
  }
  // Tile kt of the reduction into the stage at smem address `stage` (async; part of the caller's
  // cp.async group).
  __device__ __forceinline__ void issue(int kt, uint32_t stage, int tid) {
    const int kc = tid & 3;
    const int64_t k = static_cast<int64_t>(kt) * kTcBK + kc * 8;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool ok = rowp[i] != nullptr && k < red;
      cp_async_16(stage + tc_swz((tid >> 2) + 64 * i, kc), ok ? static_cast<const void*>(rowp[i] + k) : w, ok);
    }
  }
  __device__ __forceinline__ void finish(uint32_t, int) {}
};

// T (bfloat16 or half) x BSrc grouped GEMM, persistent over the schedule. Contract: red % 8 == 0,
// p.a and the B source 16-byte aligned, out [N, ncols] (or [N, ncols/2] when FUSED, ncols even),
// dynamic shared memory kTcSmem, blockDim 256. See the file comment for the layout.
template <typename T, typename BSrc, bool FUSED>
__global__ void __launch_bounds__(kTcThreads, 2)
    grouped_gemm_tc_kernel(const GemmParams<T, float> p, BSrc bsrc) {
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sA = smem_u32(smem), sB = sA + kTcStages * kTcTileBytes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3, g = lane >> 2, t4 = lane & 3;
  const int64_t K = p.red, M = p.ncols;
  const int n_ct = static_cast<int>(ceil_div_dev(M, kTcBN));
  const int KT = static_cast<int>(ceil_div_dev(K, kTcBK));
  const int64_t total = static_cast<int64_t>(p.tile_start[p.num_experts]) * n_ct;
  T* out = static_cast<T*>(p.out);

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int rt = static_cast<int>(tile / n_ct), ct = static_cast<int>(tile - static_cast<int64_t>(rt) * n_ct);
    const int e = tile_expert(p.tile_start, p.num_experts, rt);
    const int64_t row0 = p.so[e] + static_cast<int64_t>(rt - p.tile_start[e]) * kTcBM;
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTcBM), static_cast<int64_t>(p.so[e + 1]) - row0));
    const int64_t m0 = static_cast<int64_t>(ct) * kTcBN;

    // This thread's two A rows (tile rows tid/4 and tid/4 + 64), chunk tid % 4; null = zero fill.
    const T* arow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = (tid >> 2) + 64 * i;
      const int64_t src = r < rows ? gemm_src_row(p.row_index, row0 + r, p.a_rows) : -1;
      arow[i] = src >= 0 ? p.a + src * K : nullptr;
    }
    auto load_a = [&](int kt, uint32_t stage) {
      const int kc = tid & 3;
      const int64_t k = static_cast<int64_t>(kt) * kTcBK + kc * 8;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool ok = arow[i] != nullptr && k < K;
        // (a skipped copy still needs a mapped, aligned source: the schedule buffer, never empty)
        cp_async_16(stage + tc_swz((tid >> 2) + 64 * i, kc), ok ? static_cast<const void*>(arow[i] + k) : p.so, ok);
      }
    };
    bsrc.begin_tile(e, m0, tid);

#pragma unroll
    for (int s = 0; s < kTcStages - 1; ++s) {
      if (s < KT) {
        load_a(s, sA + s * kTcTileBytes);
        bsrc.issue(s, sB + s * kTcTileBytes, tid);
        bsrc.finish(sB + s * kTcTileBytes, tid);
      }
      cp_async_commit();
    }

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<kTcStages - 2>();  // tile kt's cp.async group has landed (this thread's part)
      __syncthreads();                 // ... everyone's, and stage (kt-1) % S is free again
      const int pf = kt + kTcStages - 1;
      const uint32_t pf_off = static_cast<uint32_t>(pf % kTcStages) * kTcTileBytes;
      if (pf < KT) {
        load_a(pf, sA + pf_off);
        bsrc.issue(pf, sB + pf_off, tid);
      }
      cp_async_commit();

      const uint32_t a_st = sA + static_cast<uint32_t>(kt % kTcStages) * kTcTileBytes;
      const uint32_t b_st = sB + static_cast<uint32_t>(kt % kTcStages) * kTcTileBytes;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        uint32_t af[4][4], bfr[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          ldmatrix_x4(af[mi], a_st + tc_swz(warp_m * 64 + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          uint32_t r4[4];
          ldmatrix_x4(r4, b_st + tc_swz(warp_n * 32 + nj * 16 + ((lane >> 4) << 3) + (lane & 7),
                                        2 * ks + ((lane >> 3) & 1)));
          bfr[2 * nj][0] = r4[0];
          bfr[2 * nj][1] = r4[1];
          bfr[2 * nj + 1][0] = r4[2];
          bfr[2 * nj + 1][1] = r4[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
      }
      if (pf < KT) bsrc.finish(sB + pf_off, tid);  // register-staged sources write their stage now
    }
    cp_async_wait<0>();
    __syncthreads();  // all warps are done with the ring before the next tile's prologue

    // Epilogue: accumulator (mi, ni, c) is tile row warp_m*64 + mi*16 + g + 8*(c/2), column
    // warp_n*32 + ni*8 + 2*t4 + c%2.
    const T* bias = p.bias != nullptr ? p.bias + static_cast<int64_t>(e) * M : nullptr;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * 64 + mi * 16 + g + 8 * h;
        if (r >= rows) continue;
        const int64_t gr = row0 + r;
        const bool bad = gemm_src_row(p.row_index, gr, p.a_rows) < 0;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int64_t m = m0 + warp_n * 32 + ni * 8 + 2 * t4;
          if (m >= M) continue;
          const bool has1 = m + 1 < M;
          float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
          if (bias != nullptr) {
            v0 += static_cast<float>(bias[m]);
            if (has1) v1 += static_cast<float>(bias[m + 1]);
          }
          if constexpr (FUSED) {
            const float o = swiglu_fwd<float>(v0, v1, p.alpha, p.limit);
            out[gr * (M / 2) + m / 2] = bad ? quiet_nan<T>() : static_cast<T>(o);
          } else {
            T* dst = out + gr * M + m;
            if (bad) {
              v0 = v1 = std::numeric_limits<float>::quiet_NaN();
            }
            if (has1 && (M % 2) == 0) {
              *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
            } else {
              dst[0] = static_cast<T>(v0);
              if (has1) dst[1] = static_cast<T>(v1);
            }
          }
        }
      }
    }
  }
}

// ================================================================================= SIMT path

constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

// B source, forward with a dense weight [E, ncols, red]: Bs[kk][n] = W_e[n0 + n][k0 + kk]. Thread
// tid loads 4 consecutive k (kk = 4 * (tid % 4) + q) of column n = tid / 4.
template <typename T, typename A>
struct DenseFwdB {
  static constexpr bool kForward = true;  // may fuse the SwiGLU
  const T* w = nullptr;
  int64_t ncols = 0, red = 0;
  const T* rowp = nullptr;
  __device__ __forceinline__ void begin_tile(int e, int64_t n0, int tid) {
    const int64_t n = n0 + (tid >> 2);
    rowp = n < ncols ? w + (static_cast<int64_t>(e) * ncols + n) * red : nullptr;
  }
  __device__ __forceinline__ void load(int64_t k0, A (*Bs)[kSimtBN + 4], int tid) const {
    const int n = tid >> 2, kk0 = (tid & 3) * 4;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t k = k0 + kk0 + q;
      Bs[kk0 + q][n] = rowp != nullptr && k < red ? static_cast<A>(rowp[k]) : A(0);
    }
  }
};

// B source for dX = grad_out @ W_e with a dense weight [E, red, ncols] (reduction over W's rows):
// Bs[kk][n] = W_e[k0 + kk][n0 + n]. Thread tid loads column n = tid % 64 of rows kk = 4 * (tid / 64) + q.
template <typename T, typename A>
struct DenseBwdXB {
  static constexpr bool kForward = false;
  const T* w = nullptr;
  int64_t ncols = 0, red = 0;
  const T* base = nullptr;
  int64_t n = 0;
  __device__ __forceinline__ void begin_tile(int e, int64_t n0, int tid) {
    base = w + static_cast<int64_t>(e) * red * ncols;
    n = n0 + (tid & 63);
  }
  __device__ __forceinline__ void load(int64_t k0, A (*Bs)[kSimtBN + 4], int tid) const {
    const int col = tid & 63, kk0 = (tid >> 6) * 4;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t k = k0 + kk0 + q;
      Bs[kk0 + q][col] = n < ncols && k < red ? static_cast<A>(base[k * ncols + n]) : A(0);
    }
  }
};

// SIMT grouped GEMM over the schedule (tile_start for kSimtBM rows). OutT is T (bias and the
// optional fused SwiGLU applied, one rounding) or A (raw sums, for the dX buffer; no bias, FUSED
// false). Thread (tx = tid % 16, ty = tid / 16) owns rows 4ty..4ty+3 and columns 4tx..4tx+3.
template <typename T, typename A, typename BSrc, bool FUSED, typename OutT>
__global__ void __launch_bounds__(kSimtThreads)
    grouped_gemm_simt_kernel(const GemmParams<T, A> p, BSrc bsrc) {
  __shared__ A As[kSimtBK][kSimtBM + 4];
  __shared__ A Bs[kSimtBK][kSimtBN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t K = p.red, M = p.ncols;
  const int n_ct = static_cast<int>(ceil_div_dev(M, kSimtBN));
  const int64_t total = static_cast<int64_t>(p.tile_start[p.num_experts]) * n_ct;
  OutT* out = static_cast<OutT*>(p.out);

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int rt = static_cast<int>(tile / n_ct), ct = static_cast<int>(tile - static_cast<int64_t>(rt) * n_ct);
    const int e = tile_expert(p.tile_start, p.num_experts, rt);
    const int64_t row0 = p.so[e] + static_cast<int64_t>(rt - p.tile_start[e]) * kSimtBM;
    const int rows = static_cast<int>(min(static_cast<int64_t>(kSimtBM), static_cast<int64_t>(p.so[e + 1]) - row0));
    const int64_t m0 = static_cast<int64_t>(ct) * kSimtBN;
    const int ar = tid >> 2, ak0 = (tid & 3) * 4;  // this thread's A row and first k of 4
    const int64_t asrc = ar < rows ? gemm_src_row(p.row_index, row0 + ar, p.a_rows) : -1;
    const T* arow = asrc >= 0 ? p.a + asrc * K : nullptr;
    bsrc.begin_tile(e, m0, tid);

    A acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0;

    for (int64_t k0 = 0; k0 < K; k0 += kSimtBK) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = k0 + ak0 + q;
        As[ak0 + q][ar] = arow != nullptr && k < K ? static_cast<A>(arow[k]) : A(0);
      }
      bsrc.load(k0, Bs, tid);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSimtBK; ++kk) {
        A a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }

    const T* bias = p.bias != nullptr ? p.bias + static_cast<int64_t>(e) * M : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
      if (r >= rows) continue;
      const int64_t gr = row0 + r;
      const bool bad = gemm_src_row(p.row_index, gr, p.a_rows) < 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + tx * 4 + j;
        if (m >= M) continue;
        A v = acc[i][j];
        if (bias != nullptr) v += static_cast<A>(bias[m]);
        if constexpr (FUSED) {
          // Columns 4tx + j come in interleaved pairs (j even = glu, j + 1 = lin); M is even.
          if (j % 2 == 0) {
            A lin = acc[i][j + 1];
            if (bias != nullptr) lin += static_cast<A>(bias[m + 1]);
            const A o = swiglu_fwd<A>(v, lin, p.alpha, p.limit);
            out[gr * (M / 2) + m / 2] = bad ? quiet_nan<OutT>() : static_cast<OutT>(o);
          }
        } else {
          out[gr * M + m] = bad ? quiet_nan<OutT>() : static_cast<OutT>(v);
        }
      }
    }
  }
}

// ==================================================================================== launch

// Sanitized offsets + tile starts for row tiles of bm rows (and NaN rows past the experts in out).
template <typename OutT>
Schedule make_schedule(const at::Tensor& offsets, int64_t num_experts, int64_t n_rows, int bm, OutT* out,
                       int64_t out_cols, cudaStream_t stream) {
  Schedule s;
  s.buf = at::empty({2, num_experts + 1}, offsets.options());
  int32_t* so = s.buf.mutable_data_ptr<int32_t>();
  moe_schedule_kernel<OutT><<<1, 1024, 0, stream>>>(offsets.const_data_ptr<int32_t>(), static_cast<int>(num_experts),
                                                    static_cast<int>(n_rows), bm, so, so + num_experts + 1, out,
                                                    out_cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// Persistent grid for `kernel`: the device's resident CTAs, capped by the tile upper bound.
template <typename Kernel>
unsigned persistent_grid(Kernel kernel, int threads, int smem, int64_t max_tiles) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sm_count();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, max_tiles)));
}

template <typename T, typename BSrc>
void launch_gemm_tc(const GemmParams<T, float>& p, const BSrc& bsrc, bool fused, cudaStream_t stream) {
  auto run = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTcSmem));
    const int64_t max_tiles = max_row_tiles(p.n_rows, p.num_experts, kTcBM) * ceil_div(p.ncols, kTcBN);
    kernel<<<persistent_grid(kernel, kTcThreads, kTcSmem, max_tiles), kTcThreads, kTcSmem, stream>>>(p, bsrc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fused) run(grouped_gemm_tc_kernel<T, BSrc, true>);
  else run(grouped_gemm_tc_kernel<T, BSrc, false>);
}

template <typename T, typename A, typename BSrc, typename OutT>
void launch_gemm_simt(const GemmParams<T, A>& p, const BSrc& bsrc, bool fused, cudaStream_t stream) {
  auto run = [&](auto kernel) {
    const int64_t max_tiles = max_row_tiles(p.n_rows, p.num_experts, kSimtBM) * ceil_div(p.ncols, kSimtBN);
    kernel<<<persistent_grid(kernel, kSimtThreads, 0, max_tiles), kSimtThreads, 0, stream>>>(p, bsrc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if constexpr (std::is_same_v<OutT, T> && BSrc::kForward) {
    if (fused) {
      run(grouped_gemm_simt_kernel<T, A, BSrc, true, OutT>);
      return;
    }
  }
  run(grouped_gemm_simt_kernel<T, A, BSrc, false, OutT>);
}

}  // namespace gptoss::cuda
