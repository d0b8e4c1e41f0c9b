// Attention backward on CUDA (spec §2.2), FlashAttention-2 structure, float32 accumulation.
//
// With P = exp(scale * Q K^T - lse) recomputed from the forward's lse (which includes the sink),
// dO the output gradient and Delta_i = rowsum(dO_i * O_i):
//   dV_j = sum_i P_ij dO_i,   dP_ij = dO_i . V_j,   dS_ij = P_ij (dP_ij - Delta_i),
//   dK_j = scale * sum_i dS_ij Q_i,   dQ_i = scale * sum_j dS_ij K_j,
//   dsink_h = -sum_{b,i} exp(sink_h - lse_bhi) * Delta_bhi   (the sink column has no value).
// Kernels: (1) Delta (one warp per row); (2) dK/dV, a CTA per (key tile, kv head, batch) looping
// over the query rows of all G query heads of the group that can see the tile; (3) dQ, a CTA per
// (packed row tile, kv head, batch) looping over the visible key tiles (a separate pass: no
// atomics, deterministic); (4) dsink, a CTA per query head with a fixed-order reduction
// (deterministic). Query rows are packed query-major within a kv head as in the forward:
// r = i * G + g.
// (2) and (3) run on tensor cores (mma.sync m16n8k16, the forward's tiling) for bf16/fp16 with
// D in {64, 128}, and as SIMT kernels (float32 accumulation, float64 for float64) otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "common/attention.h"
#include "cuda/mma_sm80.cuh"
#include "ops.h"

namespace gptoss {
namespace cuda_attn_bwd {
using namespace gptoss::sm80;   // cuda/mma_sm80.cuh
namespace {

constexpr int kMaxPos = 1 << 30;
constexpr int kThreads = 256;
constexpr int kBN = 32;  // keys per tile
constexpr int kBM = 16;  // packed query rows per tile
constexpr int kMaxD = 128;
constexpr int kAccPerThread = (kBN * kMaxD + kThreads - 1) / kThreads;  // dK, dV: BN x D per CTA
constexpr int kAccPerThreadQ = (kBM * kMaxD + kThreads - 1) / kThreads; // dQ: BM x D per CTA

// All tensors contiguous: q, dout, out, dq [B, Tq, Hq, D]; k, v, dk, dv [B, Tk, Hkv, D];
// lse, delta [B, Hq, Tq] in A; sinks [Hq] in A or nullptr.
template <typename T, typename A>
struct BwdParams {
  const T* q;
  const T* k;
  const T* v;
  const T* dout;
  const T* out;
  const A* lse;
  const A* sinks;
  A* delta;
  T* dq;
  T* dk;
  T* dv;
  A* dsink;
  int B, Tq, Hq, Hkv, G, D, Tk, q_offset, window;
  A scale;  // sm_scale
};

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// exp(x) with x <= 0 (a probability); fast exp2 for float, exact exp for double.
__device__ __forceinline__ float prob_exp(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double prob_exp(double x) { return exp(x); }

// (1) Delta[b, h, i] = sum_d dO * O. One warp per row; grid.x = ceil(B*Tq*Hq / 8), 8 warps.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const BwdParams<T, A> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t nrows = static_cast<int64_t>(p.B) * p.Tq * p.Hq;
  if (row >= nrows) return;
  // row indexes q's layout [B, Tq, Hq]
  const int h = static_cast<int>(row % p.Hq);
  const int i = static_cast<int>((row / p.Hq) % p.Tq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.Tq));
  const T* o = p.out + row * p.D;
  const T* g = p.dout + row * p.D;
  A acc = 0;
  for (int d = lane; d < p.D; d += 32) acc += static_cast<A>(o[d]) * static_cast<A>(g[d]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i] = acc;
}

// Shared-memory tiles of A: K/V [kBN][Dp], Q/dO [kBM][Dp] with Dp = D | 1 (odd: the (row j, dim d)
// reads of 32 consecutive j hit 32 different banks), P/dS [kBM][kBN], per-row lse/Delta/position.
template <typename A>
struct Smem {
  A* k;
  A* v;
  A* q;
  A* dout;
  A* prob;
  A* ds;
  A* lse;
  A* delta;
  int* qpos;
  int* hq;
};

__host__ __device__ inline int padded_dim(int D) { return D | 1; }

template <typename A>
__host__ __device__ inline size_t smem_bytes(int D) {
  const int Dp = padded_dim(D);
  return sizeof(A) * (2 * kBN * Dp + 2 * kBM * Dp + 2 * kBM * kBN + 2 * kBM) + sizeof(int) * 2 * kBM;
}

template <typename A>
__device__ Smem<A> carve(unsigned char* raw, int D) {
  const int Dp = padded_dim(D);
  Smem<A> s;
  A* a = reinterpret_cast<A*>(raw);
  s.k = a;
  s.v = s.k + kBN * Dp;
  s.q = s.v + kBN * Dp;
  s.dout = s.q + kBM * Dp;
  s.prob = s.dout + kBM * Dp;
  s.ds = s.prob + kBM * kBN;
  s.lse = s.ds + kBM * kBN;
  s.delta = s.lse + kBM;
  s.qpos = reinterpret_cast<int*>(s.delta + kBM);
  s.hq = s.qpos + kBM;
  return s;
}

// Loads packed rows [r0, r0 + kBM) of kv head kvh (rows >= r_end zero, qpos = -1 marks them).
template <typename T, typename A>
__device__ void load_rows(const BwdParams<T, A>& p, const Smem<A>& s, int b, int kvh, int r0, int r_end) {
  const int D = p.D, Dp = padded_dim(D);
  for (int e = threadIdx.x; e < kBM * D; e += kThreads) {
    const int r = e / D, d = e - (e / D) * D;
    const int gr = r0 + r;
    A qv = 0, gv = 0;
    if (gr < r_end) {
      const int i = gr / p.G, hq = kvh * p.G + (gr - i * p.G);
      const int64_t off = ((static_cast<int64_t>(b) * p.Tq + i) * p.Hq + hq) * D + d;
      qv = static_cast<A>(p.q[off]);
      gv = static_cast<A>(p.dout[off]);
    }
    s.q[r * Dp + d] = qv;
    s.dout[r * Dp + d] = gv;
  }
  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    const int gr = r0 + r;
    if (gr < r_end) {
      const int i = gr / p.G, hq = kvh * p.G + (gr - i * p.G);
      const int64_t li = (static_cast<int64_t>(b) * p.Hq + hq) * p.Tq + i;
      s.lse[r] = p.lse[li];
      s.delta[r] = p.delta[li];
      s.qpos[r] = p.q_offset + i;
      s.hq[r] = hq;
    } else {
      s.lse[r] = 0;
      s.delta[r] = 0;
      s.qpos[r] = -1;  // sees no key
      s.hq[r] = 0;
    }
  }
}

// Loads keys [n0, n0 + kBN) of kv head kvh (keys >= Tk zero).
template <typename T, typename A>
__device__ void load_keys(const BwdParams<T, A>& p, const Smem<A>& s, int b, int kvh, int n0) {
  const int D = p.D, Dp = padded_dim(D);
  for (int e = threadIdx.x; e < kBN * D; e += kThreads) {
    const int j = e / D, d = e - (e / D) * D;
    A kv = 0, vv = 0;
    if (n0 + j < p.Tk) {
      const int64_t off = ((static_cast<int64_t>(b) * p.Tk + n0 + j) * p.Hkv + kvh) * D + d;
      kv = static_cast<A>(p.k[off]);
      vv = static_cast<A>(p.v[off]);
    }
    s.k[j * Dp + d] = kv;
    s.v[j * Dp + d] = vv;
  }
}

// P and dS of the loaded (rows x keys) tile; masked or missing entries are exactly 0.
template <typename T, typename A>
__device__ void tile_prob_ds(const BwdParams<T, A>& p, const Smem<A>& s, int n0) {
  const int D = p.D, Dp = padded_dim(D);
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, j = e - (e / kBN) * kBN;
    const int kp = n0 + j, qp = s.qpos[r];
    A pr = 0, ds = 0;
    if (qp >= 0 && kp < p.Tk && attn_visible(kp, qp, p.window)) {
      const A* qr = s.q + r * Dp;
      const A* gr = s.dout + r * Dp;
      const A* kr = s.k + j * Dp;
      const A* vr = s.v + j * Dp;
      A dot = 0, dp = 0;
      for (int d = 0; d < D; ++d) {
        dot += qr[d] * kr[d];
        dp += gr[d] * vr[d];
      }
      pr = prob_exp(dot * p.scale - s.lse[r]);  // lse is finite: the row sees this key
      ds = pr * (dp - s.delta[r]);
    }
    s.prob[e] = pr;
    s.ds[e] = ds;
  }
}

// (2) dK, dV. grid = (ceil(Tk / kBN), Hkv, B).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const BwdParams<T, A> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem<A> s = carve<A>(smem_raw, p.D);
  const int D = p.D, Dp = padded_dim(D);
  const int n0 = blockIdx.x * kBN, kvh = blockIdx.y, b = blockIdx.z;
  const int nk = min(kBN, p.Tk - n0);
  load_keys(p, s, b, kvh, n0);

  A dk[kAccPerThread], dv[kAccPerThread];
#pragma unroll
  for (int t = 0; t < kAccPerThread; ++t) dk[t] = dv[t] = 0;

  // Query i (position q_offset + i) can see a key of [n0, n0 + nk) iff
  // q_offset + i >= n0 and (window == 0 or q_offset + i <= n0 + nk - 1 + window - 1).
  const int i_lo = max(0, n0 - p.q_offset);
  const int i_hi = p.window == 0 ? p.Tq - 1 : min(p.Tq - 1, n0 + nk + p.window - 2 - p.q_offset);
  if (i_lo <= i_hi) {
    const int r_begin = i_lo * p.G, r_end = (i_hi + 1) * p.G;
    for (int r0 = r_begin; r0 < r_end; r0 += kBM) {
      __syncthreads();  // previous tile's reads of q/dout/prob/ds are done
      load_rows(p, s, b, kvh, r0, r_end);
      __syncthreads();
      tile_prob_ds(p, s, n0);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kAccPerThread; ++t) {
        const int e = threadIdx.x + t * kThreads;
        const int j = e / D, d = e - (e / D) * D;
        if (j < kBN) {
          A av = 0, ak = 0;
#pragma unroll 4
          for (int r = 0; r < kBM; ++r) {
            av += s.prob[r * kBN + j] * s.dout[r * Dp + d];
            ak += s.ds[r * kBN + j] * s.q[r * Dp + d];
          }
          dv[t] += av;
          dk[t] += ak;
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kAccPerThread; ++t) {
    const int e = threadIdx.x + t * kThreads;
    const int j = e / D, d = e - (e / D) * D;
    if (j < nk) {
      const int64_t off = ((static_cast<int64_t>(b) * p.Tk + n0 + j) * p.Hkv + kvh) * D + d;
      p.dk[off] = static_cast<T>(dk[t] * p.scale);
      p.dv[off] = static_cast<T>(dv[t]);
    }
  }
}

// (3) dQ. grid = (ceil(Tq * G / kBM), Hkv, B).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const BwdParams<T, A> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem<A> s = carve<A>(smem_raw, p.D);
  const int D = p.D, Dp = padded_dim(D);
  const int r0 = blockIdx.x * kBM, kvh = blockIdx.y, b = blockIdx.z;
  const int R = p.Tq * p.G;
  const int nr = min(kBM, R - r0);
  load_rows(p, s, b, kvh, r0, R);

  A dq[kAccPerThreadQ];
#pragma unroll
  for (int t = 0; t < kAccPerThreadQ; ++t) dq[t] = 0;

  const int q_lo = p.q_offset + r0 / p.G, q_hi = p.q_offset + (r0 + nr - 1) / p.G;
  const int k_lo = attn_first_visible(q_lo, p.window);
  const int k_hi = min(p.Tk - 1, q_hi);
  for (int n0 = k_lo; n0 <= k_hi; n0 += kBN) {
    __syncthreads();  // previous tile's reads of k/v/ds are done (and the rows are loaded)
    load_keys(p, s, b, kvh, n0);
    __syncthreads();
    tile_prob_ds(p, s, n0);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kAccPerThreadQ; ++t) {
      const int e = threadIdx.x + t * kThreads;
      const int r = e / D, d = e - (e / D) * D;
      if (r < kBM) {
        A a = 0;
#pragma unroll 4
        for (int j = 0; j < kBN; ++j) a += s.ds[r * kBN + j] * s.k[j * Dp + d];
        dq[t] += a;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kAccPerThreadQ; ++t) {
    const int e = threadIdx.x + t * kThreads;
    const int r = e / D, d = e - (e / D) * D;
    if (r < nr) {
      const int gr = r0 + r;
      const int i = gr / p.G, hq = kvh * p.G + (gr - i * p.G);
      p.dq[((static_cast<int64_t>(b) * p.Tq + i) * p.Hq + hq) * D + d] = static_cast<T>(dq[t] * p.scale);
    }
  }
}

// (4) dsink[h] = -sum_{b,i} exp(sink_h - lse) * Delta. grid = Hq; fixed-order block reduction.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) attn_bwd_dsink_kernel(const BwdParams<T, A> p) {
  __shared__ A red[kThreads];
  const int h = blockIdx.x;
  const A sink = p.sinks[h];
  const int64_t n = static_cast<int64_t>(p.B) * p.Tq;
  A acc = 0;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t b = e / p.Tq, i = e - b * p.Tq;
    const int64_t li = (b * p.Hq + h) * p.Tq + i;
    const A l = p.lse[li];
    // The forward's lse includes the sink (lse >= sink, finite): p_sink = exp(sink - lse) <= 1.
    if (isfinite(l)) acc += prob_exp(sink - l) * p.delta[li];
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.dsink[h] = -red[0];
}

// ------------------------------------------------------------------------- PTX wrappers
// (cp.async, ldmatrix, mma_16816, pack2: cuda/mma_sm80.cuh)

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t u, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v;
    memcpy(&v, &u, 4);
    lo = __low2float(v);
    hi = __high2float(v);
  } else {
    __half2 v;
    memcpy(&v, &u, 4);
    lo = __low2float(v);
    hi = __high2float(v);
  }
}

// Shared-memory tiles [rows][D], 16-byte chunk c of row r stored at chunk c ^ (r % 8).
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---------------------------------------------------------- tensor-core backward (bf16 / fp16)
//
// Same structure as the forward MMA kernel, 4 warps x 16 rows, 64-wide tiles, every operand in
// shared memory with the forward's swizzle and fragment mappings:
// - dK/dV: a CTA owns 64 keys (M = keys, warp w owns keys 16w..16w+15) of one kv head and loops
//   over the packed query rows (i * G + g, every query head of the group) that can see them, 64 at
//   a time (N = queries): S^T = K Q^T, dP^T = V dO^T, P^T = exp2(S^T scale log2e - lse log2e),
//   dS^T = P^T (dP^T - Delta); dV += P^T dO, dK += dS^T Q (P^T, dS^T reused as A fragments).
//   Deterministic: each key's gradient is summed by one CTA in a fixed order.
// - dQ: a CTA owns 64 packed query rows and loops over the visible key tiles:
//   S = Q K^T, dP = dO V^T, dS = P (dP - Delta), dQ += dS K.
// Inputs contiguous and 16-byte aligned (checked on the host); lse/Delta float32.

constexpr int kMmaThreads = 128;
constexpr int kMT = 64;  // keys per dK/dV CTA, query rows per step, rows per dQ CTA, keys per dQ step

struct MmaBwdParams {
  const void* q;     // [B, Tq, Hq, D]
  const void* k;     // [B, Tk, Hkv, D]
  const void* v;     // [B, Tk, Hkv, D]
  const void* dout;  // [B, Tq, Hq, D]
  const float* lse;    // [B, Hq, Tq] natural log
  const float* delta;  // [B, Hq, Tq]
  void* dq;
  void* dk;
  void* dv;
  int B, Tq, Hq, Hkv, G, D, Tk, q_offset, window, R;
  float scale;       // sm_scale
  float scale_log2;  // sm_scale * log2(e)
};

template <int D>
constexpr int dkdv_smem_bytes() {
  return (2 * kMT * D + 4 * kMT * D) * 2 + 2 * kMT * (2 * sizeof(float) + sizeof(int));
}
template <int D>
constexpr int dq_smem_bytes() {
  return (2 * kMT * D + 4 * kMT * D) * 2;
}

// grid = (ceil(Tk / 64), Hkv, B)
template <int D, typename T>
__global__ void __launch_bounds__(kMmaThreads) attn_bwd_dkdv_mma_kernel(const MmaBwdParams p) {
  constexpr int DC = D / 8, KS = D / 16, NQ = kMT / 8, PQ = kMT / 16, DT = D / 8;
  // D = 128: keep the k-step loops rolled, so that the 128 accumulator registers fit (no spills).
  constexpr int kUnrollKS = D > 64 ? 1 : KS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [kMT][D]
  T* sV = sK + kMT * D;                    // [kMT][D]
  T* sQ = sV + kMT * D;                    // [2][kMT][D]
  T* sG = sQ + 2 * kMT * D;                // [2][kMT][D] (dO)
  float* sL = reinterpret_cast<float*>(sG + 2 * kMT * D);  // [2][kMT] lse * log2(e)
  float* sDl = sL + 2 * kMT;                               // [2][kMT] Delta
  int* sPos = reinterpret_cast<int*>(sDl + 2 * kMT);       // [2][kMT] query position, -1 = none

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * kMT, kvh = blockIdx.y, b = blockIdx.z;
  const int G = p.G;
  const int nk = min(kMT, p.Tk - n0);
  const T* kg = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
  const T* vg = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
  const int64_t kv_st = static_cast<int64_t>(p.Hkv) * D;
  const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.Tq * p.Hq * D;
  const T* gg = static_cast<const T*>(p.dout) + static_cast<int64_t>(b) * p.Tq * p.Hq * D;

  // Packed rows that can see a key of [n0, n0 + nk): query position q_offset + i >= n0 and
  // (window == 0 or q_offset + i <= n0 + nk - 1 + window - 1).
  const int i_lo = max(0, n0 - p.q_offset);
  const int i_hi = p.window == 0 ? p.Tq - 1 : min(p.Tq - 1, n0 + nk + p.window - 2 - p.q_offset);
  const int r_begin = i_lo * G;
  const int r_end = i_lo <= i_hi ? (i_hi + 1) * G : r_begin;
  const int nsteps = (r_end - r_begin + kMT - 1) / kMT;

  for (int c = tid; c < kMT * DC; c += kMmaThreads) {
    const int r = c / DC, ch = c % DC;
    const bool valid = r < nk;
    cp_async_16(smem_u32(sK + swz<D>(r, ch)), valid ? kg + (n0 + r) * kv_st + ch * 8 : kg, valid);
    cp_async_16(smem_u32(sV + swz<D>(r, ch)), valid ? vg + (n0 + r) * kv_st + ch * 8 : vg, valid);
  }
  auto load_rows = [&](int buf, int r0) {
    T* dq_ = sQ + buf * kMT * D;
    T* dg_ = sG + buf * kMT * D;
    for (int c = tid; c < kMT * DC; c += kMmaThreads) {
      const int r = c / DC, ch = c % DC;
      const int gr = r0 + r;
      const bool valid = gr < r_end;
      int64_t off = 0;
      if (valid) {
        const int i = gr / G, h = kvh * G + (gr - i * G);
        off = (static_cast<int64_t>(i) * p.Hq + h) * D + ch * 8;
      }
      cp_async_16(smem_u32(dq_ + swz<D>(r, ch)), qg + off, valid);
      cp_async_16(smem_u32(dg_ + swz<D>(r, ch)), gg + off, valid);
    }
    for (int r = tid; r < kMT; r += kMmaThreads) {
      const int gr = r0 + r;
      float l2 = 0.f, dl = 0.f;
      int pos = -1;
      if (gr < r_end) {
        const int i = gr / G, h = kvh * G + (gr - i * G);
        const int64_t li = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i;
        l2 = p.lse[li] * 1.4426950408889634f;
        dl = p.delta[li];
        pos = p.q_offset + i;
      }
      sL[buf * kMT + r] = l2;
      sDl[buf * kMT + r] = dl;
      sPos[buf * kMT + r] = pos;
    }
  };
  if (nsteps > 0) load_rows(0, r_begin);
  cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dj = 0; dj < DT; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.f;
  const int krow0 = warp * 16;
  const int kpos[2] = {n0 + krow0 + (lane >> 2), n0 + krow0 + (lane >> 2) + 8};

  for (int step = 0; step < nsteps; ++step) {
    const int buf = step & 1;
    const int r0 = r_begin + step * kMT;
    cp_async_wait<0>();
    __syncthreads();  // this step's rows have landed; the previous step's reads of buf ^ 1 are done
    if (step + 1 < nsteps) load_rows(buf ^ 1, r0 + kMT);
    cp_async_commit();
    const T* sQb = sQ + buf * kMT * D;
    const T* sGb = sG + buf * kMT * D;
    const float* sLb = sL + buf * kMT;
    const float* sDb = sDl + buf * kMT;
    const int* sPb = sPos + buf * kMT;

    // The step is interior when every key of the tile exists and is visible to every (real) row.
    const int q_lo = p.q_offset + r0 / G;
    const int q_hi = p.q_offset + (min(r0 + kMT, r_end) - 1) / G;
    const bool interior = r0 + kMT <= r_end && n0 + kMT <= p.Tk && n0 + kMT - 1 <= q_lo &&
                          (p.window == 0 || n0 > q_hi - p.window);
    // P^T = exp2(S^T scale log2e - lse log2e), S^T = K Q^T, kept only as 16-bit A fragments
    // (k-step kq: queries 16kq..16kq+15) to bound the registers live next to the dK/dV accumulators.
    uint32_t pa[PQ][4], da[PQ][4];
    {
      float st[NQ][4];
#pragma unroll
      for (int nj = 0; nj < NQ; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nj][e] = 0.f;
#pragma unroll kUnrollKS
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t ka[4];
        ldmatrix_x4(ka, smem_u32(sK + swz<D>(krow0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4))));
#pragma unroll
        for (int nj = 0; nj < NQ; nj += 2) {
          uint32_t qb[4];
          ldmatrix_x4(qb, smem_u32(sQb + swz<D>(nj * 8 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1))));
          mma_16816<T>(st[nj], ka, qb[0], qb[1]);
          mma_16816<T>(st[nj + 1], ka, qb[2], qb[3]);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NQ; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nj * 8 + (lane & 3) * 2 + (e & 1);
          const int kp = kpos[e >> 1];
          const int qp = sPb[col];
          const bool vis = interior || (qp >= 0 && kp < p.Tk && attn_visible(kp, qp, p.window));
          st[nj][e] = vis ? exp2f(fmaf(st[nj][e], p.scale_log2, -sLb[col])) : 0.f;
        }
#pragma unroll
      for (int kq = 0; kq < PQ; ++kq) {
        pa[kq][0] = pack2<T>(st[2 * kq][0], st[2 * kq][1]);
        pa[kq][1] = pack2<T>(st[2 * kq][2], st[2 * kq][3]);
        pa[kq][2] = pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]);
        pa[kq][3] = pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3]);
      }
    }
    // dV += P^T dO (B[k = query][n = dim] = dO[query][dim]: transposed ldmatrix)
#pragma unroll
    for (int kq = 0; kq < PQ; ++kq) {
#pragma unroll
      for (int dj = 0; dj < DT; dj += 2) {
        uint32_t gb[4];
        ldmatrix_x4_trans(gb, smem_u32(sGb + swz<D>(kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dj + (lane >> 4))));
        mma_16816<T>(dv[dj], pa[kq], gb[0], gb[1]);
        mma_16816<T>(dv[dj + 1], pa[kq], gb[2], gb[3]);
      }
    }
    // dS^T = P^T (dP^T - Delta), dP^T = V dO^T, with the same 16-bit P^T the dV product used.
    {
      float dpt[NQ][4];
#pragma unroll
      for (int nj = 0; nj < NQ; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nj][e] = 0.f;
#pragma unroll kUnrollKS
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t va[4];
        ldmatrix_x4(va, smem_u32(sV + swz<D>(krow0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4))));
#pragma unroll
        for (int nj = 0; nj < NQ; nj += 2) {
          uint32_t gb[4];
          ldmatrix_x4(gb, smem_u32(sGb + swz<D>(nj * 8 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1))));
          mma_16816<T>(dpt[nj], va, gb[0], gb[1]);
          mma_16816<T>(dpt[nj + 1], va, gb[2], gb[3]);
        }
      }
#pragma unroll
      for (int kq = 0; kq < PQ; ++kq)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          // register r of k-step kq holds n-tile 2kq + (r >> 1), C elements 2 (r & 1), 2 (r & 1) + 1
          const int nj = 2 * kq + (r >> 1), e0 = 2 * (r & 1);
          const int col = nj * 8 + (lane & 3) * 2;
          float p0, p1;
          unpack2<T>(pa[kq][r], p0, p1);
          da[kq][r] = pack2<T>(p0 * (dpt[nj][e0] - sDb[col]), p1 * (dpt[nj][e0 + 1] - sDb[col + 1]));
        }
    }
    // dK += dS^T Q (B[k = query][n = dim] = Q[query][dim]: transposed ldmatrix, as V in the forward)
#pragma unroll
    for (int kq = 0; kq < PQ; ++kq) {
#pragma unroll
      for (int dj = 0; dj < DT; dj += 2) {
        uint32_t qb[4];
        ldmatrix_x4_trans(qb, smem_u32(sQb + swz<D>(kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dj + (lane >> 4))));
        mma_16816<T>(dk[dj], da[kq], qb[0], qb[1]);
        mma_16816<T>(dk[dj + 1], da[kq], qb[2], qb[3]);
      }
    }
  }
  cp_async_wait<0>();

  T* dkg = static_cast<T*>(p.dk) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
  T* dvg = static_cast<T*>(p.dv) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kpos[h] >= p.Tk) continue;
    const int64_t off = kpos[h] * kv_st + (lane & 3) * 2;
#pragma unroll
    for (int dj = 0; dj < DT; ++dj) {
      *reinterpret_cast<uint32_t*>(dkg + off + dj * 8) = pack2<T>(dk[dj][2 * h] * p.scale, dk[dj][2 * h + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + off + dj * 8) = pack2<T>(dv[dj][2 * h], dv[dj][2 * h + 1]);
    }
  }
}

// grid = (ceil(R / 64) row tiles, heaviest first; Hkv; B)
template <int D, typename T>
__global__ void __launch_bounds__(kMmaThreads) attn_bwd_dq_mma_kernel(const MmaBwdParams p) {
  constexpr int DC = D / 8, KS = D / 16, NT = kMT / 8, PK = kMT / 16, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kMT][D]
  T* sG = sQ + kMT * D;                    // [kMT][D] (dO)
  T* sK = sG + kMT * D;                    // [2][kMT][D]
  T* sV = sK + 2 * kMT * D;                // [2][kMT][D]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int mtile = gridDim.x - 1 - blockIdx.x;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int G = p.G;
  const int row0 = mtile * kMT;
  const int nrows = min(kMT, p.R - row0);
  const int q_lo = p.q_offset + row0 / G;
  const int q_hi = p.q_offset + (row0 + nrows - 1) / G;
  const int key_lo = attn_first_visible(q_lo, p.window);
  const int key_hi = min(p.Tk - 1, q_hi);
  int t_begin = 0, t_end = 0;
  if (key_lo <= key_hi) {
    t_begin = key_lo / kMT;
    t_end = key_hi / kMT + 1;
  }
  const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.Tq * p.Hq * D;
  const T* gg = static_cast<const T*>(p.dout) + static_cast<int64_t>(b) * p.Tq * p.Hq * D;
  const T* kg = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
  const T* vg = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Tk * p.Hkv + kvh) * D;
  const int64_t kv_st = static_cast<int64_t>(p.Hkv) * D;

  for (int c = tid; c < kMT * DC; c += kMmaThreads) {
    const int r = c / DC, ch = c % DC;
    const bool valid = r < nrows;
    int64_t off = 0;
    if (valid) {
      const int gr = row0 + r;
      const int i = gr / G, h = kvh * G + (gr - i * G);
      off = (static_cast<int64_t>(i) * p.Hq + h) * D + ch * 8;
    }
    cp_async_16(smem_u32(sQ + swz<D>(r, ch)), qg + off, valid);
    cp_async_16(smem_u32(sG + swz<D>(r, ch)), gg + off, valid);
  }
  auto load_tile = [&](const T* base, T* dst, int t) {
    for (int c = tid; c < kMT * DC; c += kMmaThreads) {
      const int r = c / DC, ch = c % DC;
      const int pos = t * kMT + r;
      const bool valid = pos < p.Tk;
      cp_async_16(smem_u32(dst + swz<D>(r, ch)), valid ? base + pos * kv_st + ch * 8 : base, valid);
    }
  };
  if (t_begin < t_end) load_tile(kg, sK, t_begin);
  cp_async_commit();
  if (t_begin < t_end) load_tile(vg, sV, t_begin);
  cp_async_commit();

  // Rows gid and gid + 8 of the warp's 16: position (-1 = padding), lse * log2(e), Delta.
  int qpos[2];
  float lse2[2], dlt[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rr = warp * 16 + (lane >> 2) + 8 * h;
    qpos[h] = -1;
    lse2[h] = 0.f;
    dlt[h] = 0.f;
    if (rr < nrows) {
      const int gr = row0 + rr;
      const int i = gr / G, hq = kvh * G + (gr - i * G);
      const int64_t li = (static_cast<int64_t>(b) * p.Hq + hq) * p.Tq + i;
      qpos[h] = p.q_offset + i;
      lse2[h] = p.lse[li] * 1.4426950408889634f;
      dlt[h] = p.delta[li];
    }
  }
  float dq[DT][4];
#pragma unroll
  for (int dj = 0; dj < DT; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dj][e] = 0.f;
  uint32_t qf[KS][4], gf[KS][4];

  for (int t = t_begin; t < t_end; ++t) {
    const int buf = (t - t_begin) & 1;
    const T* sKb = sK + buf * kMT * D;
    const T* sVb = sV + buf * kMT * D;
    cp_async_wait<1>();  // Q, dO and K(t) have landed
    __syncthreads();
    if (t + 1 < t_end) load_tile(kg, sK + (buf ^ 1) * kMT * D, t + 1);
    cp_async_commit();
    if (t == t_begin) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = kk * 2 + (lane >> 4);
        ldmatrix_x4(qf[kk], smem_u32(sQ + swz<D>(row, ch)));
        ldmatrix_x4(gf[kk], smem_u32(sG + swz<D>(row, ch)));
      }
    }
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nj][e] = dp[nj][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int nj = 0; nj < NT; nj += 2) {
        const int key = nj * 8 + (lane & 7) + (lane >> 4) * 8;
        const int ch = kk * 2 + ((lane >> 3) & 1);
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_u32(sKb + swz<D>(key, ch)));
        mma_16816<T>(s[nj], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[nj + 1], qf[kk], kb[2], kb[3]);
      }
    cp_async_wait<1>();  // V(t) has landed
    __syncthreads();
    if (t + 1 < t_end) load_tile(vg, sV + (buf ^ 1) * kMT * D, t + 1);
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int nj = 0; nj < NT; nj += 2) {
        const int key = nj * 8 + (lane & 7) + (lane >> 4) * 8;
        const int ch = kk * 2 + ((lane >> 3) & 1);
        uint32_t vb[4];
        ldmatrix_x4(vb, smem_u32(sVb + swz<D>(key, ch)));
        mma_16816<T>(dp[nj], gf[kk], vb[0], vb[1]);
        mma_16816<T>(dp[nj + 1], gf[kk], vb[2], vb[3]);
      }
    const int n0 = t * kMT;
    const bool interior = n0 + kMT <= p.Tk && n0 + kMT - 1 <= q_lo && (p.window == 0 || n0 > q_hi - p.window);
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int kp = n0 + nj * 8 + (lane & 3) * 2 + (e & 1);
        const bool vis = interior || (qpos[h] >= 0 && kp < p.Tk && attn_visible(kp, qpos[h], p.window));
        const float pr = vis ? exp2f(fmaf(s[nj][e], p.scale_log2, -lse2[h])) : 0.f;
        dp[nj][e] = pr * (dp[nj][e] - dlt[h]);
      }
    // dQ += dS K (B[k = key][n = dim] = K[key][dim]: transposed ldmatrix, as V in the forward)
#pragma unroll
    for (int kk2 = 0; kk2 < PK; ++kk2) {
      uint32_t da[4];
      da[0] = pack2<T>(dp[2 * kk2][0], dp[2 * kk2][1]);
      da[1] = pack2<T>(dp[2 * kk2][2], dp[2 * kk2][3]);
      da[2] = pack2<T>(dp[2 * kk2 + 1][0], dp[2 * kk2 + 1][1]);
      da[3] = pack2<T>(dp[2 * kk2 + 1][2], dp[2 * kk2 + 1][3]);
#pragma unroll
      for (int dj = 0; dj < DT; dj += 2) {
        const int key = kk2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = dj + (lane >> 4);
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, smem_u32(sKb + swz<D>(key, ch)));
        mma_16816<T>(dq[dj], da, kb[0], kb[1]);
        mma_16816<T>(dq[dj + 1], da, kb[2], kb[3]);
      }
    }
  }
  cp_async_wait<0>();

  T* dqg = static_cast<T*>(p.dq) + static_cast<int64_t>(b) * p.Tq * p.Hq * D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rr = warp * 16 + (lane >> 2) + 8 * h;
    if (rr >= nrows) continue;
    const int gr = row0 + rr;
    const int i = gr / G, hq = kvh * G + (gr - i * G);
    const int64_t off = (static_cast<int64_t>(i) * p.Hq + hq) * D + (lane & 3) * 2;
#pragma unroll
    for (int dj = 0; dj < DT; ++dj)
      *reinterpret_cast<uint32_t*>(dqg + off + dj * 8) = pack2<T>(dq[dj][2 * h] * p.scale, dq[dj][2 * h + 1] * p.scale);
  }
}

template <int D, typename T>
void launch_mma_bwd(const MmaBwdParams& p, cudaStream_t stream) {
  constexpr int smem_kv = dkdv_smem_bytes<D>();
  constexpr int smem_q = dq_smem_bytes<D>();
  auto kdkdv = attn_bwd_dkdv_mma_kernel<D, T>;
  auto kdq = attn_bwd_dq_mma_kernel<D, T>;
  if (smem_kv > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kdkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_kv));
  if (smem_q > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kdq, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_q));
  if (p.Tk > 0) {
    const dim3 grid((p.Tk + kMT - 1) / kMT, p.Hkv, p.B);
    kdkdv<<<grid, kMmaThreads, smem_kv, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 grid((p.R + kMT - 1) / kMT, p.Hkv, p.B);
  kdq<<<grid, kMmaThreads, smem_q, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Delta, then dK/dV and dQ (tensor cores when `mma`, else SIMT), then dsink.
template <typename T, typename A>
void launch_all(BwdParams<T, A> p, bool has_sinks, bool mma, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Tq * p.Hq;
  attn_bwd_delta_kernel<T, A><<<static_cast<unsigned>((rows + 7) / 8), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (std::is_same_v<A, float> && (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>)) {
    if (mma) {
      using MT = std::conditional_t<std::is_same_v<T, c10::BFloat16>, __nv_bfloat16, __half>;
      MmaBwdParams m{};
      m.q = p.q, m.k = p.k, m.v = p.v, m.dout = p.dout, m.lse = p.lse, m.delta = p.delta;
      m.dq = p.dq, m.dk = p.dk, m.dv = p.dv;
      m.B = p.B, m.Tq = p.Tq, m.Hq = p.Hq, m.Hkv = p.Hkv, m.G = p.G, m.D = p.D, m.Tk = p.Tk;
      m.q_offset = p.q_offset, m.window = p.window, m.R = p.Tq * p.G;
      m.scale = p.scale;
      m.scale_log2 = p.scale * 1.4426950408889634f;
      if (p.D == 64) launch_mma_bwd<64, MT>(m, stream);
      else launch_mma_bwd<128, MT>(m, stream);
      if (has_sinks) {
        attn_bwd_dsink_kernel<T, A><<<p.Hq, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
  }
  const size_t smem = smem_bytes<A>(p.D);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<T, A>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dq_kernel<T, A>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  if (p.Tk > 0) {
    const dim3 grid((p.Tk + kBN - 1) / kBN, p.Hkv, p.B);
    attn_bwd_dkdv_kernel<T, A><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    const dim3 grid((p.Tq * p.G + kBM - 1) / kBM, p.Hkv, p.B);
    attn_bwd_dq_kernel<T, A><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (has_sinks) {
    attn_bwd_dsink_kernel<T, A><<<p.Hq, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& sinks, const at::Tensor& out_in, const at::Tensor& lse_in, double sm_scale,
    int64_t window, int64_t q_offset) {
  check_attention_backward(grad_out_in, q_in, k_in, v_in, sinks, out_in, lse_in, sm_scale, window, q_offset);
  TORCH_CHECK(q_in.is_cuda(), "attention_backward (CUDA): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Tk = k_in.size(1), Hkv = k_in.size(2);
  const auto acc = acc_dtype(q_in.scalar_type());
  const bool has_sinks = sinks.has_value() && sinks->defined();

  // Every kernel here reads contiguous tensors; the tensor-core path also needs 16-byte alignment.
  const bool mma = (q_in.scalar_type() == at::kBFloat16 || q_in.scalar_type() == at::kHalf) && (D == 64 || D == 128);
  auto ready = [&](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return mma && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0 ? c.clone() : c;
  };
  at::Tensor q = ready(q_in), k = ready(k_in), v = ready(v_in), dout = ready(grad_out_in);
  at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dsink_acc = at::zeros({has_sinks ? Hq : 0}, q.options().dtype(acc));
  auto finish = [&]() {
    at::Tensor gs = has_sinks ? dsink_acc.to(sinks->scalar_type()) : at::empty({0}, q.options());
    return std::make_tuple(dq, dk, dv, gs);
  };
  if (q.numel() == 0 || k.numel() == 0) {  // no query or no key: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return finish();  // dsink = 0 too: rows without keys have out = 0, so Delta = 0
  }
  TORCH_CHECK(Tk < kMaxPos && q_offset + Tq < kMaxPos && Tq * (Hq / Hkv) < kMaxPos,
              "attention_backward (CUDA): positions must stay below 2^30");
  TORCH_CHECK(B <= 65535 && Hkv <= 65535, "attention_backward (CUDA): B and Hkv must be <= 65535");
  at::Tensor sinks_a = has_sinks ? sinks->to(acc).contiguous() : at::Tensor();
  at::Tensor delta = at::empty({B, Hq, Tq}, q.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int iwindow = window >= kMaxPos ? 0 : static_cast<int>(window);

  auto run = [&](auto t_tag, auto a_tag) {
    using T = decltype(t_tag);
    using A = decltype(a_tag);
    BwdParams<T, A> p{};
    p.q = static_cast<const T*>(q.data_ptr());
    p.k = static_cast<const T*>(k.data_ptr());
    p.v = static_cast<const T*>(v.data_ptr());
    p.dout = static_cast<const T*>(dout.data_ptr());
    p.out = static_cast<const T*>(out.data_ptr());
    p.lse = static_cast<const A*>(lse.data_ptr());
    p.sinks = has_sinks ? static_cast<const A*>(sinks_a.data_ptr()) : nullptr;
    p.delta = static_cast<A*>(delta.data_ptr());
    p.dq = static_cast<T*>(dq.data_ptr());
    p.dk = static_cast<T*>(dk.data_ptr());
    p.dv = static_cast<T*>(dv.data_ptr());
    p.dsink = has_sinks ? static_cast<A*>(dsink_acc.data_ptr()) : nullptr;
    p.B = static_cast<int>(B);
    p.Tq = static_cast<int>(Tq);
    p.Hq = static_cast<int>(Hq);
    p.Hkv = static_cast<int>(Hkv);
    p.G = static_cast<int>(Hq / Hkv);
    p.D = static_cast<int>(D);
    p.Tk = static_cast<int>(Tk);
    p.q_offset = static_cast<int>(q_offset);
    p.window = iwindow;
    p.scale = static_cast<A>(sm_scale);
    launch_all<T, A>(p, has_sinks, mma, stream);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}, float{}); break;
    case at::kDouble: run(double{}, double{}); break;
    case at::kBFloat16: run(c10::BFloat16{}, float{}); break;
    case at::kHalf: run(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, "attention_backward (CUDA): unsupported dtype ", q.scalar_type());
  }
  return finish();
}

}  // namespace
}  // namespace cuda_attn_bwd
}  // namespace gptoss

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("attention_backward", &gptoss::cuda_attn_bwd::attention_backward_cuda);
}
