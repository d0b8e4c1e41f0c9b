// Attention forward on CUDA (spec §2.2): prefill `attention`, `kv_cache_append` and
// `attention_decode` (split-K over the cache). The backward is in attention_bwd.cu.
//
// Two kernels compute the forward, both for prefill and decode:
// - attn_fwd_mma_kernel: bf16/fp16, head dim 64 or 128, tensor cores (mma.sync m16n8k16 with f32
//   accumulation, ldmatrix, cp.async), FlashAttention-2 structure. Available on sm_80 and newer.
// - attn_fwd_simt_kernel: every other case (float32, float64, other head dims), one warp per query
//   row, float32 (float64 for float64) accumulation.
//
// GQA: a CTA works for ONE kv head and packs the query rows of all G = Hq/Hkv query heads of its
// group into the tile's M dimension, query-major: packed row r = i * G + g is query i of query head
// kvh * G + g. Each K/V tile loaded into shared memory thus serves the whole group (K/V are never
// repeated, and a decode step with Tq = 1 and G = 8 fills 8 rows of the tile instead of 1).
//
// Keys are addressed by position p; the key/value row of position p is row slot(p) of k/v:
//   prefill: p in [0, Tk), slot = p;
//   decode:  query i sits at position L + i with L = lengths[b] (read on the device: no host sync,
//            CUDA-graph capturable); positions [pmin, pmax] exist, pmax = L + Tq - 1 (clamped to
//            S - 1 without a ring), pmin = max(0, L + Tq - S) with a ring; slot = p % S (ring) or p.
// Nothing outside the existing positions is ever read; a sequence whose length is negative or
// absurd (> 2^30) is treated as empty (its rows get out 0), never as an out-of-bounds read.
//
// Split-K (decode): the key tiles of a row tile are divided among num_splits CTAs; each writes an
// un-normalised partial (acc, m, l) WITHOUT the sink to a float32 workspace and
// attn_combine_kernel merges the partials and the sink (common/attention.h, softmax_combine).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss {
namespace cuda_attn {
using namespace gptoss::sm80;   // cuda/mma_sm80.cuh
using gptoss::cuda::sm_count;
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Positions, lengths, cache sizes and query counts stay below 2^30 so that every position
// expression in the kernels (L + Tq, q - window + 1, ...) fits in int32.
constexpr int kMaxPos = 1 << 30;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;  // [B, Tq, Hq, D] contiguous, q's dtype (unused while splitting)
  void* lse;  // [B, Hq, Tq] float32 (float64 for float64 q) (unused while splitting)
  // Element strides of q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D] (the MMA path needs *_sd == 1).
  int64_t q_sb, q_st, q_sh, q_sd;
  int64_t k_sb, k_st, k_sh, k_sd;
  int64_t v_sb, v_st, v_sh, v_sd;
  int B, Tq, Hq, Hkv, G, D;
  int R;         // packed rows per (b, kv head) = Tq * G
  int Tk;        // prefill: number of keys; decode: cache slots S
  int q_offset;  // prefill: position of query 0
  const int* lengths;  // decode: [B] int32 on the device
  bool ring;           // decode: slot = position % S
  int window;          // 0 = full causal
  float scale_log2;    // sm_scale * log2(e)
  double scale_log2_d; // the same in float64 (float64 path)
  const void* sinks;   // [Hq] in the accumulation dtype (float32 / float64), or nullptr
  int num_splits;      // >= 1; > 1 writes partials to ws_*
  int split_size;      // MMA: key tiles per split; SIMT: keys per split
  float* ws_acc;       // [num_splits, B*Hq*Tq, D] un-normalised accumulators
  float* ws_ml;        // [num_splits, B*Hq*Tq, 2]: (m in log2 units, l without the sink)
};

struct KeyBounds {
  int qoff;  // position of query 0
  int pmin;  // first existing key position
  int pmax;  // last existing key position (pmax < pmin: no keys)
};

template <bool kDecode>
__device__ __forceinline__ KeyBounds key_bounds(const FwdParams& p, int b) {
  if (!kDecode) return {p.q_offset, 0, p.Tk - 1};
  const int L = p.lengths[b];
  if (L < 0 || L > kMaxPos) return {0, 1, 0};  // bad length: no keys (Python reports the error)
  int pmax = L + p.Tq - 1;
  int pmin = 0;
  if (p.ring) {
    pmin = max(0, L + p.Tq - p.Tk);
  } else {
    pmax = min(pmax, p.Tk - 1);
  }
  return {L, pmin, pmax};
}

// Shared-memory tiles are [rows][D] of 16-bit elements in 16-byte chunks (8 elements). Chunk c of
// row r is stored at chunk position c ^ (r % 8): the 8 row addresses of one ldmatrix 8x8 matrix
// (same logical chunk, 8 consecutive rows) then hit 8 different 16-byte bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// --------------------------------------------------------------------------- the tensor-core kernel

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kBlockN = 64;  // keys per K/V tile

template <int D, int MT>
constexpr int mma_smem_bytes() {
  // Q tile (reused to stage the output) + double-buffered K and V tiles, 2-byte elements.
  return (kMmaWarps * 16 * MT * D + 4 * kBlockN * D) * 2;
}

// Grid: x = row tiles (heaviest first), y = kv head * num_splits + split, z = batch.
// Block: 4 warps; warp w owns packed rows [w*16*MT, (w+1)*16*MT) of the tile (MT m16 tiles).
// Requirements (checked on the host): T is bf16 or fp16, D in {64, 128}, q/k/v have unit stride in
// D, their other strides are multiples of 8 elements and their data is 16-byte aligned.
template <int D, int MT, bool kDecode, typename T>
__global__ void __launch_bounds__(kMmaThreads) attn_fwd_mma_kernel(const FwdParams p) {
  static_assert(D % 16 == 0 && D <= 128, "head dim");
  constexpr int BN = kBlockN;
  constexpr int BM = kMmaWarps * 16 * MT;
  constexpr int DC = D / 8;   // 16-byte chunks per row
  constexpr int KS = D / 16;  // k-steps of S = Q K^T
  constexpr int NT = BN / 8;  // n-tiles (8 keys) of S
  constexpr int PK = BN / 16; // k-steps of O += P V
  constexpr int DT = D / 8;   // n-tiles (8 dims) of O

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sK = sQ + BM * D;                     // [2][BN][D]
  T* sV = sK + 2 * BN * D;                 // [2][BN][D]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int mtile = gridDim.x - 1 - blockIdx.x;
  const int kvh = blockIdx.y / p.num_splits;
  const int split = blockIdx.y - kvh * p.num_splits;
  const int b = blockIdx.z;
  const int G = p.G;
  const int row0 = mtile * BM;
  const int nrows = min(BM, p.R - row0);
  const bool splitting = p.num_splits > 1;

  const KeyBounds kb = key_bounds<kDecode>(p, b);
  const int q_lo = kb.qoff + row0 / G;                // first query position of the tile
  const int q_hi = kb.qoff + (row0 + nrows - 1) / G;  // last query position of the tile
  const int key_lo = max(kb.pmin, attn_first_visible(q_lo, p.window));
  const int key_hi = min(kb.pmax, q_hi);
  // Key tiles [t_begin, t_end) of BN positions each, aligned to multiples of BN.
  int t_begin = 0, t_end = 0;
  if (key_lo <= key_hi) {
    t_begin = key_lo / BN;
    t_end = key_hi / BN + 1;
  }
  if (splitting) {
    const int ts = t_begin + split * p.split_size;
    const int te = split == p.num_splits - 1 ? t_end : min(t_end, ts + p.split_size);
    t_begin = ts < te ? ts : 0;
    t_end = ts < te ? te : 0;
  }

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // ---- prologue: group 0 = Q tile + K(t_begin), group 1 = V(t_begin)
  for (int c = tid; c < BM * DC; c += kMmaThreads) {
    const int r = c / DC, ch = c % DC;
    const bool valid = r < nrows;
    const int gr = row0 + r;
    const int i = gr / G, g = gr - i * G;
    const T* src = valid ? qg + i * p.q_st + (kvh * G + g) * p.q_sh + ch * 8 : qg;
    cp_async_16(smem_u32(sQ + swz<D>(r, ch)), src, valid);
  }
  auto load_tile = [&](const T* base, int64_t st, T* dst, int t) {
    for (int c = tid; c < BN * DC; c += kMmaThreads) {
      const int r = c / DC, ch = c % DC;
      const int pos = t * BN + r;
      const bool valid = pos >= kb.pmin && pos <= kb.pmax;
      const T* src = base;
      if (valid) {
        const int slot = (kDecode && p.ring) ? pos % p.Tk : pos;
        src = base + slot * st + ch * 8;
      }
      cp_async_16(smem_u32(dst + swz<D>(r, ch)), src, valid);
    }
  };
  if (t_begin < t_end) load_tile(kg, p.k_st, sK, t_begin);
  cp_async_commit();
  if (t_begin < t_end) load_tile(vg, p.v_st, sV, t_begin);
  cp_async_commit();

  // ---- per-thread row state: rows gid and gid + 8 of each m16 tile
  const bool has_sink = p.sinks != nullptr;
  const bool warp_active = warp * 16 * MT < nrows;
  int qpos[MT][2];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * h;
      qpos[mt][h] = rr < nrows ? kb.qoff + (row0 + rr) / G : q_hi;
      const int hq = kvh * G + (rr < nrows ? (row0 + rr) % G : 0);
      const float sink2 = has_sink ? static_cast<const float*>(p.sinks)[hq] * kLog2e : 0.f;
      softmax_init(has_sink && !splitting, sink2, m_run[mt][h], l_run[mt][h]);
    }
  }
  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dj = 0; dj < DT; ++dj)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dj][e] = 0.f;
  uint32_t qf[MT][KS][4];

  // ---- main loop over key tiles
  for (int t = t_begin; t < t_end; ++t) {
    const int buf = (t - t_begin) & 1;
    const T* sKb = sK + buf * BN * D;
    const T* sVb = sV + buf * BN * D;
    cp_async_wait<1>();  // everything but V(t): Q and K(t) have landed
    __syncthreads();
    if (t + 1 < t_end) load_tile(kg, p.k_st, sK + (buf ^ 1) * BN * D, t + 1);
    cp_async_commit();

    float s[MT][NT][4];
    if (warp_active) {
      if (t == t_begin) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < KS; ++kk) {
            // matrices: (rows 0-7, chunk 2kk), (rows 8-15, 2kk), (rows 0-7, 2kk+1), (rows 8-15, 2kk+1)
            const int row = warp * 16 * MT + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int ch = kk * 2 + (lane >> 4);
            ldmatrix_x4(qf[mt][kk], smem_u32(sQ + swz<D>(row, ch)));
          }
      }
      // S = Q K^T (raw dot products, float32)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nj = 0; nj < NT; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nj][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int nj = 0; nj < NT; nj += 2) {
          // matrices: (keys nj, chunk 2kk), (keys nj, 2kk+1), (keys nj+1, 2kk), (keys nj+1, 2kk+1)
          // = b0, b1 of n-tile nj and b0, b1 of n-tile nj + 1 (B[k][n] = K[key n][dim k]).
          uint32_t kf[4];
          const int key = nj * 8 + (lane & 7) + (lane >> 4) * 8;
          const int ch = kk * 2 + ((lane >> 3) & 1);
          ldmatrix_x4(kf, smem_u32(sKb + swz<D>(key, ch)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(s[mt][nj], qf[mt][kk], kf[0], kf[1]);
            mma_16816<T>(s[mt][nj + 1], qf[mt][kk], kf[2], kf[3]);
          }
        }
      }
      // Mask only tiles that are not wholly visible to every row of the tile.
      const int n0 = t * BN, n1 = n0 + BN - 1;
      const bool interior = n0 >= kb.pmin && n1 <= kb.pmax && n1 <= q_lo &&
                            (p.window == 0 || n0 > q_hi - p.window);
      if (!interior) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nj = 0; nj < NT; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int kp = n0 + nj * 8 + (lane & 3) * 2 + (e & 1);
              const int qp = qpos[mt][e >> 1];
              if (!(kp >= kb.pmin && kp <= kb.pmax && attn_visible(kp, qp, p.window)))
                s[mt][nj][e] = -INFINITY;
            }
      }
      // Online softmax in log2 units; the 4 lanes of a quad share a row.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = -INFINITY;
#pragma unroll
          for (int nj = 0; nj < NT; ++nj) mx = fmaxf(mx, fmaxf(s[mt][nj][2 * h], s[mt][nj][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float alpha = softmax_update_max<true>(m_run[mt][h], mx * p.scale_log2);
          const float off = softmax_offset(m_run[mt][h]);
          float rs = 0.f;
#pragma unroll
          for (int nj = 0; nj < NT; ++nj)
#pragma unroll
            for (int e = 2 * h; e < 2 * h + 2; ++e) {
              s[mt][nj][e] = exp2f(fmaf(s[mt][nj][e], p.scale_log2, -off));
              rs += s[mt][nj][e];
            }
          l_run[mt][h] = l_run[mt][h] * alpha + rs;
#pragma unroll
          for (int dj = 0; dj < DT; ++dj) {
            o[mt][dj][2 * h] *= alpha;
            o[mt][dj][2 * h + 1] *= alpha;
          }
        }
    }

    cp_async_wait<1>();  // everything but K(t+1): V(t) has landed
    __syncthreads();
    if (t + 1 < t_end) load_tile(vg, p.v_st, sV + (buf ^ 1) * BN * D, t + 1);
    cp_async_commit();

    if (warp_active) {
      // P (C fragments of n-tiles 2kk2, 2kk2+1) is the A fragment of k-step kk2.
#pragma unroll
      for (int kk2 = 0; kk2 < PK; ++kk2) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * kk2][0], s[mt][2 * kk2][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * kk2][2], s[mt][2 * kk2][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * kk2 + 1][0], s[mt][2 * kk2 + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * kk2 + 1][2], s[mt][2 * kk2 + 1][3]);
        }
#pragma unroll
        for (int dj = 0; dj < DT; dj += 2) {
          // matrices: (keys 0-7, chunk dj), (keys 8-15, dj), (keys 0-7, dj+1), (keys 8-15, dj+1),
          // transposed = b0, b1 of d-tile dj and b0, b1 of d-tile dj + 1 (B[k][n] = V[key k][dim n]).
          uint32_t vf[4];
          const int key = kk2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = dj + (lane >> 4);
          ldmatrix_x4_trans(vf, smem_u32(sVb + swz<D>(key, ch)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(o[mt][dj], pa[mt], vf[0], vf[1]);
            mma_16816<T>(o[mt][dj + 1], pa[mt], vf[2], vf[3]);
          }
        }
      }
    }
  }

  // ---- epilogue
  cp_async_wait<0>();
  __syncthreads();  // sQ is free (Q fragments loaded, no copy in flight): stage the output there
  const int NR = p.B * p.Hq * p.Tq;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float L = l_run[mt][h];
      L += __shfl_xor_sync(0xffffffffu, L, 1);
      L += __shfl_xor_sync(0xffffffffu, L, 2);
      const int rr = warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * h;
      const bool valid = rr < nrows;
      const int gr = row0 + rr;
      const int i = gr / G, hq = kvh * G + (gr - (gr / G) * G);
      const int ridx = (b * p.Hq + hq) * p.Tq + i;
      if (splitting) {
        if (valid) {
          float* acc = p.ws_acc + (static_cast<int64_t>(split) * NR + ridx) * D + (lane & 3) * 2;
#pragma unroll
          for (int dj = 0; dj < DT; ++dj)
            *reinterpret_cast<float2*>(acc + dj * 8) = make_float2(o[mt][dj][2 * h], o[mt][dj][2 * h + 1]);
          if ((lane & 3) == 0) {
            float* ml = p.ws_ml + (static_cast<int64_t>(split) * NR + ridx) * 2;
            ml[0] = m_run[mt][h];
            ml[1] = L;
          }
        }
      } else {
        const float sink2 = has_sink && valid ? static_cast<const float*>(p.sinks)[hq] * kLog2e : 0.f;
        float sc, lse2;
        softmax_finalize<true>(m_run[mt][h], L, has_sink, sink2, sc, lse2);
#pragma unroll
        for (int dj = 0; dj < DT; ++dj) {
          const uint32_t v2 = pack2<T>(o[mt][dj][2 * h] * sc, o[mt][dj][2 * h + 1] * sc);
          *reinterpret_cast<uint32_t*>(sQ + swz<D>(rr, dj) + (lane & 3) * 2) = v2;
        }
        if (valid && (lane & 3) == 0) static_cast<float*>(p.lse)[ridx] = lse2 * kLn2;
      }
    }
  if (!splitting) {
    __syncthreads();
    T* og = static_cast<T*>(p.out);
    for (int c = tid; c < BM * DC; c += kMmaThreads) {
      const int r = c / DC, ch = c % DC;
      if (r >= nrows) continue;
      const int gr = row0 + r;
      const int i = gr / G, hq = kvh * G + (gr - i * G);
      T* dst = og + ((static_cast<int64_t>(b) * p.Tq + i) * p.Hq + hq) * D + ch * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + swz<D>(r, ch));
    }
  }
}

// ------------------------------------------------------------------------------- the SIMT kernel

constexpr int kSimtWarps = 4;

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One warp per packed row. Grid: x = ceil(R / 4) row groups, y = kv head * num_splits + split,
// z = batch. Any dtype, any strides, D <= 128 (each lane accumulates dims lane + 32 t, t < 4).
// A is the accumulation type (float, or double for float64). Splitting only with A = float.
template <typename T, typename A, bool kDecode>
__global__ void __launch_bounds__(kSimtWarps * 32) attn_fwd_simt_kernel(const FwdParams p) {
  __shared__ A sq[kSimtWarps][128];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rr = blockIdx.x * kSimtWarps + warp;
  const int kvh = blockIdx.y / p.num_splits;
  const int split = blockIdx.y - kvh * p.num_splits;
  const int b = blockIdx.z;
  if (rr >= p.R) return;  // whole warp; the kernel has no block-wide barrier
  const int D = p.D;
  const int i = rr / p.G, hq = kvh * p.G + (rr - i * p.G);
  const KeyBounds kb = key_bounds<kDecode>(p, b);
  const int qp = kb.qoff + i;

  const T* qr = static_cast<const T*>(p.q) + b * p.q_sb + i * p.q_st + hq * p.q_sh;
  for (int d = lane; d < D; d += 32) sq[warp][d] = static_cast<A>(qr[d * p.q_sd]);
  __syncwarp();

  // Every key in [lo, hi] exists and is visible to this row.
  int lo = max(kb.pmin, attn_first_visible(qp, p.window));
  int hi = min(kb.pmax, qp);
  if (p.num_splits > 1 && lo <= hi) {
    const int s0 = lo + split * p.split_size;  // split_size * num_splits < 2^30 (host)
    const int s1 = split == p.num_splits - 1 ? hi : min(hi, s0 + p.split_size - 1);
    lo = s0;
    hi = s1;
  }
  const bool has_sink = p.sinks != nullptr;
  const bool splitting = p.num_splits > 1;
  const A scale_log2 = std::is_same_v<A, double> ? static_cast<A>(p.scale_log2_d) : static_cast<A>(p.scale_log2);
  const A sink2 = has_sink ? static_cast<const A*>(p.sinks)[hq] * static_cast<A>(1.4426950408889634) : A(0);
  A m, l;
  softmax_init(has_sink && !splitting, sink2, m, l);
  A acc[4] = {A(0), A(0), A(0), A(0)};

  const T* kb_ = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vb_ = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;
  auto slot_of = [&](int pos) -> int64_t { return (kDecode && p.ring) ? pos % p.Tk : pos; };
  for (int j0 = lo; j0 <= hi; j0 += 32) {
    const int j = j0 + lane;
    const bool valid = j <= hi;
    A s = -static_cast<A>(INFINITY);
    if (valid) {
      const T* kr = kb_ + slot_of(j) * p.k_st;
      A dot = 0;
      for (int d = 0; d < D; ++d) dot += sq[warp][d] * static_cast<A>(kr[d * p.k_sd]);
      s = dot * scale_log2;
    }
    const A alpha = softmax_update_max<true>(m, warp_max(s));
    const A off = softmax_offset(m);
    const A pj = valid ? attn_exp(s - off, true) : A(0);
    l = l * alpha + warp_sum(pj);
#pragma unroll
    for (int t = 0; t < 4; ++t) acc[t] *= alpha;
    const int n = min(32, hi - j0 + 1);
    for (int jj = 0; jj < n; ++jj) {
      const A pp = __shfl_sync(0xffffffffu, pj, jj);
      const T* vr = vb_ + slot_of(j0 + jj) * p.v_st;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int d = lane + 32 * t;
        if (d < D) acc[t] += pp * static_cast<A>(vr[d * p.v_sd]);
      }
    }
  }

  const int ridx = (b * p.Hq + hq) * p.Tq + i;
  if (splitting) {
    if constexpr (std::is_same_v<A, float>) {
      const int NR = p.B * p.Hq * p.Tq;
      float* wa = p.ws_acc + (static_cast<int64_t>(split) * NR + ridx) * D;
#pragma unroll
      for (int t = 0; t < 4; ++t)
        if (lane + 32 * t < D) wa[lane + 32 * t] = acc[t];
      if (lane == 0) {
        p.ws_ml[(static_cast<int64_t>(split) * NR + ridx) * 2] = m;
        p.ws_ml[(static_cast<int64_t>(split) * NR + ridx) * 2 + 1] = l;
      }
    }
    return;
  }
  A sc, lse2;
  softmax_finalize<true>(m, l, has_sink, sink2, sc, lse2);
  T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + i) * p.Hq + hq) * D;
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (lane + 32 * t < D) orow[lane + 32 * t] = static_cast<T>(acc[t] * sc);
  if (lane == 0) static_cast<A*>(p.lse)[ridx] = lse2 * static_cast<A>(0.6931471805599453);
}

// Merges the num_splits partials of each row with the sink. One warp per output row
// ridx = (b * Hq + h) * Tq + i; grid.x = ceil(B*Hq*Tq / 4).
template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) attn_combine_kernel(const FwdParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t NR = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  const int64_t ridx = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp;
  if (ridx >= NR) return;
  const int D = p.D;
  const int i = static_cast<int>(ridx % p.Tq);
  const int hq = static_cast<int>((ridx / p.Tq) % p.Hq);
  const int b = static_cast<int>(ridx / (static_cast<int64_t>(p.Tq) * p.Hq));
  const bool has_sink = p.sinks != nullptr;
  const float sink2 = has_sink ? static_cast<const float*>(p.sinks)[hq] * kLog2e : 0.f;
  float M, L;
  softmax_init(has_sink, sink2, M, L);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < p.num_splits; ++s) {
    const float* ml = p.ws_ml + (s * NR + ridx) * 2;
    float sr, sp;
    softmax_combine<true>(M, L, ml[0], ml[1], sr, sp);
    const float* wa = p.ws_acc + (s * NR + ridx) * D;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int d = lane + 32 * t;
      // sp == 0 for an empty partial: skip it rather than multiply (its acc is 0 anyway).
      if (d < D) acc[t] = acc[t] * sr + (sp != 0.f ? wa[d] * sp : 0.f);
    }
  }
  float sc, lse2;
  softmax_finalize<true>(M, L, has_sink, sink2, sc, lse2);
  T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + i) * p.Hq + hq) * D;
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (lane + 32 * t < D) orow[lane + 32 * t] = static_cast<T>(acc[t] * sc);
  if (lane == 0) static_cast<float*>(p.lse)[ridx] = lse2 * kLn2;
}

// ------------------------------------------------------------------------------ kv_cache_append

// One thread per element of k (and v): new token i of sequence b goes to slot (lengths[b] + i) % S
// (ring) or lengths[b] + i (no ring; dropped when >= S). A negative length writes nothing. E is an
// unsigned integer of the element's size (the copy is bitwise).
template <typename E>
__global__ void kv_cache_append_kernel(E* __restrict__ kc, E* __restrict__ vc, const E* __restrict__ k,
                                       const E* __restrict__ v, const int* __restrict__ lengths, int64_t Tn,
                                       int64_t S, int64_t H, int64_t D, int64_t k_sb, int64_t k_st,
                                       int64_t k_sh, int64_t k_sd, int64_t v_sb, int64_t v_st, int64_t v_sh,
                                       int64_t v_sd, int64_t total, bool ring) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % D;
    const int64_t h = (e / D) % H;
    const int64_t i = (e / (D * H)) % Tn;
    const int64_t b = e / (D * H * Tn);
    const int64_t L = lengths[b];
    if (L < 0) continue;
    const int64_t pos = L + i;
    if (!ring && pos >= S) continue;
    const int64_t slot = ring ? pos % S : pos;
    const int64_t dst = ((b * S + slot) * H + h) * D + d;
    kc[dst] = k[b * k_sb + i * k_st + h * k_sh + d * k_sd];
    vc[dst] = v[b * v_sb + i * v_st + h * v_sh + d * v_sd];
  }
}

// ------------------------------------------------------------------------------------ host side

bool mma_aligned(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool use_mma(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  return (dt == at::kBFloat16 || dt == at::kHalf) && (q.size(3) == 64 || q.size(3) == 128);
}

void set_qkv(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2), p.q_sd = q.stride(3);
  p.k_sb = k.stride(0), p.k_st = k.stride(1), p.k_sh = k.stride(2), p.k_sd = k.stride(3);
  p.v_sb = v.stride(0), p.v_st = v.stride(1), p.v_sh = v.stride(2), p.v_sd = v.stride(3);
  p.B = static_cast<int>(q.size(0));
  p.Tq = static_cast<int>(q.size(1));
  p.Hq = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.Hkv = static_cast<int>(k.size(2));
  p.G = p.Hq / p.Hkv;
  p.R = p.Tq * p.G;
}

// One instance of the tensor-core kernel: its rows per CTA, shared memory and entry point.
template <int D, int MT, bool kDecode, typename T>
struct MmaConfig {
  static constexpr int BM = kMmaWarps * 16 * MT;
  static constexpr int smem = mma_smem_bytes<D, MT>();
  static constexpr auto kernel = attn_fwd_mma_kernel<D, MT, kDecode, T>;
};

// Calls f(MmaConfig<...>{}) for the tensor-core kernel of (dtype, D, decode). Prefill D = 64 (the
// gpt-oss head dim) runs 32 rows per warp (MT = 2, 128-row tiles): each K/V fragment read from
// shared memory feeds two MMAs. Decode (few packed rows per kv head) and D = 128 (register budget)
// run MT = 1 (64-row tiles).
template <bool kDecode, typename F>
void with_mma_config(at::ScalarType dt, int D, F&& f) {
  TORCH_CHECK(D == 64 || D == 128, "attention (CUDA): internal error, MMA path with D = ", D);
  if (dt == at::kBFloat16) {
    if (D == 64) f(MmaConfig<64, kDecode ? 1 : 2, kDecode, __nv_bfloat16>{});
    else f(MmaConfig<128, 1, kDecode, __nv_bfloat16>{});
  } else {
    TORCH_CHECK(dt == at::kHalf, "attention (CUDA): internal error, MMA path with ", dt);
    if (D == 64) f(MmaConfig<64, kDecode ? 1 : 2, kDecode, __half>{});
    else f(MmaConfig<128, 1, kDecode, __half>{});
  }
}

template <typename C>
void allow_smem(C) {
  if (C::smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(C::kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::smem));
}

// Resident CTAs per SM of the kernel (cached per device).
template <typename C>
int ctas_per_sm(C cfg, int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  allow_smem(cfg);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, C::kernel, kMmaThreads, C::smem));
  n = std::max(n, 1);
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

template <typename C>
void launch_mma(C cfg, const FwdParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.q_sd == 1 && p.k_sd == 1 && p.v_sd == 1, "attention (CUDA): internal error, MMA path needs unit D stride");
  allow_smem(cfg);
  const dim3 grid((p.R + C::BM - 1) / C::BM, p.Hkv * p.num_splits, p.B);
  C::kernel<<<grid, kMmaThreads, C::smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// MMA path inputs: unit stride in D, 16-byte aligned rows; anything else is copied contiguous.
at::Tensor mma_ready(const at::Tensor& t) { return mma_aligned(t) ? t : t.contiguous(); }

c10::optional<at::Tensor> sinks_acc(const c10::optional<at::Tensor>& sinks, c10::ScalarType acc) {
  if (!sinks.has_value() || !sinks->defined()) return c10::nullopt;
  return sinks->to(acc).contiguous();
}

// Runs the forward for fully set-up params (everything but the split plan), then the split-K
// combine when the plan splits. `max_keys` bounds the number of key positions one query can see
// (a row tile of the MMA path adds its own span of positions).
template <bool kDecode>
void run_forward(FwdParams& p, const at::Tensor& q, bool mma, int64_t max_keys, const char* op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dt = q.scalar_type();
  const int64_t sms = sm_count();  // (the caller's guard made q's device current)
  int64_t bm = kSimtWarps, slots = 16 * sms, units = 0, min_units = 1;
  if (mma) {
    with_mma_config<kDecode>(dt, p.D, [&](auto cfg) {
      bm = decltype(cfg)::BM;
      slots = ctas_per_sm(cfg, q.get_device()) * sms;
    });
    // Key tiles a row tile can touch: its positions span at most bm / G + 1 queries (or Tq).
    const int64_t pos = std::min<int64_t>(p.Tq, bm / p.G + 1);
    const int64_t span = p.window > 0 ? std::min<int64_t>(max_keys, p.window + pos - 1) : max_keys;
    units = (span + kBlockN - 1) / kBlockN + 1;  // +1: tiles are aligned to multiples of kBlockN
    min_units = 2;
  } else if (dt != at::kDouble) {
    units = p.window > 0 ? std::min<int64_t>(max_keys, p.window) : max_keys;  // keys of one row
    min_units = 128;
  }
  // Split-K when the (b, kv head, row tile) CTAs fill less than one wave: as many splits as fill
  // the wave, each with at least min_units key tiles (MMA) or keys (SIMT). The last split of a row
  // takes whatever is left, so any plan covers every key.
  const int64_t base = static_cast<int64_t>(p.B) * p.Hkv * ((p.R + bm - 1) / bm);
  int64_t splits = std::min<int64_t>(slots / std::max<int64_t>(base, 1), units / min_units);
  p.num_splits = 1;
  p.split_size = 0;
  at::Tensor ws_acc, ws_ml;
  if (splits > 1) {
    const int64_t size = (units + splits - 1) / splits;
    splits = (units + size - 1) / size;
    p.num_splits = static_cast<int>(splits);
    p.split_size = static_cast<int>(size);
    const int64_t NR = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
    ws_acc = at::empty({splits, NR, p.D}, q.options().dtype(at::kFloat));
    ws_ml = at::empty({splits, NR, 2}, q.options().dtype(at::kFloat));
    p.ws_acc = ws_acc.data_ptr<float>();
    p.ws_ml = ws_ml.data_ptr<float>();
  }
  TORCH_CHECK(p.B <= 65535, op, " (CUDA): batch size must be <= 65535, got ", p.B);
  TORCH_CHECK(static_cast<int64_t>(p.Hkv) * p.num_splits <= 65535, op,
              " (CUDA): kv heads x splits must be <= 65535, got ", p.Hkv, " x ", p.num_splits);

  if (mma) {
    with_mma_config<kDecode>(dt, p.D, [&](auto cfg) { launch_mma(cfg, p, stream); });
  } else {
    const dim3 grid((p.R + kSimtWarps - 1) / kSimtWarps, p.Hkv * p.num_splits, p.B);
    auto run = [&](auto kernel) {
      kernel<<<grid, kSimtWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (dt) {
      case at::kFloat: run(attn_fwd_simt_kernel<float, float, kDecode>); break;
      case at::kDouble: run(attn_fwd_simt_kernel<double, double, kDecode>); break;
      case at::kBFloat16: run(attn_fwd_simt_kernel<c10::BFloat16, float, kDecode>); break;
      case at::kHalf: run(attn_fwd_simt_kernel<c10::Half, float, kDecode>); break;
      default: TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", dt);
    }
  }
  if (p.num_splits > 1) {
    const int64_t NR = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
    const dim3 grid(static_cast<unsigned>((NR + kSimtWarps - 1) / kSimtWarps));
    auto run = [&](auto kernel) {
      kernel<<<grid, kSimtWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (dt) {
      case at::kFloat: run(attn_combine_kernel<float>); break;
      case at::kBFloat16: run(attn_combine_kernel<c10::BFloat16>); break;
      case at::kHalf: run(attn_combine_kernel<c10::Half>); break;
      default: TORCH_CHECK(false, op, " (CUDA): internal error, split-K for ", dt);
    }
  }
}

void set_common(FwdParams& p, at::Tensor& out, at::Tensor& lse, const c10::optional<at::Tensor>& s,
                double sm_scale, int64_t window) {
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.window = window >= kMaxPos ? 0 : static_cast<int>(window);  // a window beyond every position = none
  p.scale_log2 = static_cast<float>(sm_scale * 1.4426950408889634);
  p.scale_log2_d = sm_scale * 1.4426950408889634;
  p.sinks = s.has_value() ? s->data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const c10::optional<at::Tensor>& sinks,
                                                  double sm_scale, int64_t window, int64_t q_offset) {
  check_attention(q_in, k_in, v_in, sinks, sm_scale, window, q_offset);
  TORCH_CHECK(q_in.is_cuda(), "attention (CUDA): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Tk = k_in.size(1);
  const auto acc = acc_dtype(q_in.scalar_type());
  at::Tensor out = at::empty({B, Tq, Hq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Tq}, q_in.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  TORCH_CHECK(Tk < kMaxPos && q_offset < kMaxPos && Tq < kMaxPos && q_offset + Tq < kMaxPos &&
                  Tq * (Hq / k_in.size(2)) < kMaxPos,
              "attention (CUDA): positions must stay below 2^30 (Tk = ", Tk, ", q_offset = ", q_offset,
              ", Tq = ", Tq, ")");
  const bool mma = use_mma(q_in);
  const at::Tensor q = mma ? mma_ready(q_in) : q_in;
  const at::Tensor k = mma ? mma_ready(k_in) : k_in;
  const at::Tensor v = mma ? mma_ready(v_in) : v_in;
  const auto s = sinks_acc(sinks, acc);

  FwdParams p{};
  set_qkv(p, q, k, v);
  set_common(p, out, lse, s, sm_scale, window);
  p.Tk = static_cast<int>(Tk);
  p.q_offset = static_cast<int>(q_offset);
  p.lengths = nullptr;
  p.ring = false;
  run_forward<false>(p, q, mma, std::max<int64_t>(1, std::min<int64_t>(Tk, q_offset + Tq)),
                     "attention");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                                         const at::Tensor& v_cache_in, const at::Tensor& lengths_in,
                                                         const c10::optional<at::Tensor>& sinks, double sm_scale,
                                                         int64_t window, bool ring) {
  check_attention_decode(q_in, k_cache_in, v_cache_in, lengths_in, sinks, sm_scale, window, ring);
  TORCH_CHECK(q_in.is_cuda(), "attention_decode (CUDA): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t S = k_cache_in.size(1), Hkv = k_cache_in.size(2);
  const auto acc = acc_dtype(q_in.scalar_type());
  at::Tensor out = at::empty({B, Tq, Hq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Tq}, q_in.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  TORCH_CHECK(S < kMaxPos && Tq < kMaxPos / 2 && Tq * (Hq / Hkv) < kMaxPos,
              "attention_decode (CUDA): cache size and token counts must stay below 2^30 (S = ", S,
              ", Tq = ", Tq, ")");
  const bool mma = use_mma(q_in);
  const at::Tensor q = mma ? mma_ready(q_in) : q_in;
  const at::Tensor k = mma ? mma_ready(k_cache_in) : k_cache_in;
  const at::Tensor v = mma ? mma_ready(v_cache_in) : v_cache_in;
  const at::Tensor lengths = lengths_in.contiguous();
  const auto s = sinks_acc(sinks, acc);

  FwdParams p{};
  set_qkv(p, q, k, v);
  set_common(p, out, lse, s, sm_scale, window);
  p.Tk = static_cast<int>(S);
  p.q_offset = 0;
  p.lengths = lengths.data_ptr<int>();
  p.ring = ring;
  run_forward<true>(p, q, mma, std::max<int64_t>(1, S), "attention_decode");
  return {out, lse};
}

void kv_cache_append_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& lengths_in, bool ring) {
  check_kv_cache_append(k_cache, v_cache, k, v, lengths_in, ring);
  TORCH_CHECK(k_cache.is_cuda(), "kv_cache_append (CUDA): k_cache must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t B = k.size(0), Tn = k.size(1), H = k.size(2), D = k.size(3), S = k_cache.size(1);
  const int64_t total = B * Tn * H * D;
  if (total == 0 || S == 0) return;
  const at::Tensor lengths = lengths_in.contiguous();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag) {
    using E = decltype(tag);
    kv_cache_append_kernel<E><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<E*>(k_cache.data_ptr()), static_cast<E*>(v_cache.data_ptr()), static_cast<const E*>(k.data_ptr()),
        static_cast<const E*>(v.data_ptr()), lengths.data_ptr<int>(), Tn, S, H, D, k.stride(0), k.stride(1),
        k.stride(2), k.stride(3), v.stride(0), v.stride(1), v.stride(2), v.stride(3), total, ring);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (k_cache.element_size()) {
    case 2: launch(uint16_t{}); break;
    case 4: launch(uint32_t{}); break;
    case 8: launch(uint64_t{}); break;
    default: TORCH_CHECK(false, "kv_cache_append (CUDA): unsupported element size ", k_cache.element_size());
  }
}

}  // namespace
}  // namespace cuda_attn
}  // namespace gptoss

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("attention", &gptoss::cuda_attn::attention_cuda);
  m.impl("attention_decode", &gptoss::cuda_attn::attention_decode_cuda);
  m.impl("kv_cache_append", &gptoss::cuda_attn::kv_cache_append_cuda);
}
