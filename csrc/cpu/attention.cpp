// Attention with learned sinks, GQA, causal + sliding window on the CPU (spec §2.2): prefill
// forward and backward, KV-cache append, and decode over a (ragged, optionally ring) cache.
//
// Forward (flash style): a work unit is (batch b, kv heads, block of query positions, key chunk):
// one kv head per unit for prefill, all of them (up to kMaxUnitRows rows) when there is a single
// query block (decode), so a unit streams whole contiguous cache rows. Its rows are the block's
// positions x the G = Hq/Hkv query heads of each of its kv heads, so each K/V tile is loaded
// (converted to float, K transposed; in bf16, K in place for AMX tiles (prefill and decode) or as
// raw pairs for AVX512-BF16 (decode without AMX), V as pairs of keys) once for the whole group.
// Per key tile:
// S = Q K^T (register-tiled GEMM), mask, online softmax (common/attention.h: the sink joins the
// denominator at the end), O = O * alpha + P V. Only tiles that intersect a row's visible range
// [pos - window + 1, pos] are visited, so window layers cost O(T * window). No buffer grows with
// Tq x Tk. Units are handed out dynamically (costliest first) and each writes only its own rows,
// so results do not depend on the schedule.
// Split-K: when there are few units for the threads (decode of a few sequences, few kv heads),
// each unit's key range is cut into C chunks whose partial (m, l, acc) states are merged in a
// fixed order. C (like the backward's dQ partial count) follows the thread count, so results are
// bitwise reproducible for a given thread count and agree to rounding across thread counts.
//
// Backward (flash-attention-2 style, recomputing P from lse): a task is (b, kv head, key-tile
// class c); it owns dK/dV of its key tiles (summed over the group's query heads) and adds
// dS K into its own dQ partial buffer; the C partials are summed in order at the end
// (deterministic). D_i = rowsum(dO * O); dS = P * (dP - D_i); d sink = -sum p_sink * D_i.
// In bf16 on AMX, S and dP come from tiles (exact bf16 products, float sums).
//
// float32/bfloat16/float16 compute in float32 (bf16 products exact, P and dS as bf16 hi + lo on
// AMX; the vdpbf16ps decode rounds P to bf16); float64 runs the same algorithm in float64 (used
// by gradcheck).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "common/attention.h"
#include "common/dispatch.h"
#include "common/vec.h"
#include "ops.h"

namespace gptoss::cpu {
namespace {

template <typename acc_t>
using AVec = at::vec::Vectorized<acc_t>;

constexpr int64_t kBK = 64;           // keys per tile
constexpr int64_t kRowsTarget = 128;  // query rows (positions x group heads) per block
constexpr int64_t kMinSplitKeys = 256;  // fewest keys worth a split-K chunk

// Register tile of the GEMM micro-kernel: kMR rows x kNV vectors of C stay in registers.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 6, kNV = 4;  // 24 accumulators + 4 B vectors + 1 broadcast of 32 zmm
#else
constexpr int kMR = 4, kNV = 2;  // 16 ymm
#endif

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------ GEMM kernels
// C[M, N] (+)= op(A) B, op(A)[m][k] = TA ? A[k * lda + m] : A[m * lda + k], B [K, N] row-major
// with N a multiple of the vector size. Accumulates in acc_t.
template <typename acc_t, int MR, int NV, bool TA, bool ACC>
inline void gemm_tile(int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, acc_t* C,
                      int64_t ldc) {
  using V = AVec<acc_t>;
  constexpr int VS = V::size();
  V c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) c[i][j] = ACC ? V::loadu(C + i * ldc + j * VS) : V(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = V::loadu(B + k * ldb + j * VS);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V a(TA ? A[k * lda + i] : A[i * lda + k]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) c[i][j] = at::vec::fmadd(a, b[j], c[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) c[i][j].store(C + i * ldc + j * VS);
}

template <typename acc_t, int MR, bool TA, bool ACC, int NV = kNV - 1>
inline void gemm_cols_tail(int64_t nv, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                           int64_t ldb, acc_t* C, int64_t ldc) {
  if constexpr (NV > 0) {
    if (nv == NV) {
      gemm_tile<acc_t, MR, NV, TA, ACC>(K, A, lda, B, ldb, C, ldc);
    } else {
      gemm_cols_tail<acc_t, MR, TA, ACC, NV - 1>(nv, K, A, lda, B, ldb, C, ldc);
    }
  }
}

template <typename acc_t, int MR, bool TA, bool ACC>
inline void gemm_rows(int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                      acc_t* C, int64_t ldc) {
  constexpr int64_t VS = AVec<acc_t>::size();
  int64_t n = 0;
  for (; n + kNV * VS <= N; n += kNV * VS) gemm_tile<acc_t, MR, kNV, TA, ACC>(K, A, lda, B + n, ldb, C + n, ldc);
  if (n < N) gemm_cols_tail<acc_t, MR, TA, ACC>((N - n) / VS, K, A, lda, B + n, ldb, C + n, ldc);
}

template <typename acc_t, bool TA, bool ACC, int MR = kMR - 1>
inline void gemm_rows_tail(int64_t mr, int64_t N, int64_t K, const acc_t* A, int64_t lda,
                           const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
  if constexpr (MR > 0) {
    if (mr == MR) {
      gemm_rows<acc_t, MR, TA, ACC>(N, K, A, lda, B, ldb, C, ldc);
    } else {
      gemm_rows_tail<acc_t, TA, ACC, MR - 1>(mr, N, K, A, lda, B, ldb, C, ldc);
    }
  }
}

template <typename acc_t, bool TA, bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
          acc_t* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    gemm_rows<acc_t, kMR, TA, ACC>(N, K, TA ? A + m : A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  if (m < M)
    gemm_rows_tail<acc_t, TA, ACC>(M - m, N, K, TA ? A + m : A + m * lda, lda, B, ldb, C + m * ldc, ldc);
}

// --------------------------------------------------------------------------- small helpers

// dst[0:n] = src[0:n] converted to acc_t.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(src[i]);
  } else {
    for_vec(n, [&](int64_t i, int64_t c) {
      (c == kVecSize ? load_f(src + i) : load_f(src + i, c)).store(dst + i, c);
    });
  }
}

// dst[0:n] = src[0:n] * s, converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, acc_t s, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * s);
  } else {
    const fVec vs(s);
    for_vec(n, [&](int64_t i, int64_t c) { store_f(dst + i, fVec::loadu(src + i, c) * vs, c); });
  }
}

template <typename acc_t>
inline void scale_row(acc_t* x, acc_t s, int64_t n) {  // n a multiple of the vector size
  using V = AVec<acc_t>;
  const V vs(s);
  for (int64_t i = 0; i < n; i += V::size()) (V::loadu(x + i) * vs).store(x + i);
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {  // n a multiple of the vector size
  using V = AVec<acc_t>;
  V m(attn_neg_inf<acc_t>());
  for (int64_t i = 0; i < n; i += V::size()) m = at::vec::maximum(m, V::loadu(x + i));
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, m);
}

// exp: the fast polynomial for bf16/fp16 storage (its ~1e-6 relative error is far below their
// rounding), the 1-ulp Sleef version for float32 and float64.
template <typename acc_t, bool FAST>
inline AVec<acc_t> vexp(const AVec<acc_t>& x) {
  if constexpr (FAST && std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// x[0:n] = exp(x * scale - shift) (masked entries -inf give 0); returns the sum.
template <typename acc_t, bool FAST>
inline acc_t exp_row(acc_t* x, int64_t n, acc_t scale, acc_t shift) {
  using V = AVec<acc_t>;
  const V vscale(scale), vneg(-shift);
  V sum(acc_t(0));
  for (int64_t i = 0; i < n; i += V::size()) {
    const V p = vexp<acc_t, FAST>(at::vec::fmadd(V::loadu(x + i), vscale, vneg));
    p.store(x + i);
    sum = sum + p;
  }
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, sum);
}

#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16 x 16 float block: r[i] holds row i on entry, column i on exit.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// Row i < n of a tile whose rows are strided by `stride` from src, except that rows i >= n1 (past
// a ring cache's wrap) continue from src2.
template <typename T>
inline const T* tile_row(const T* src, const T* src2, int64_t stride, int64_t n1, int64_t i) {
  return i < n1 ? src + i * stride : src2 + (i - n1) * stride;
}

// dst[d * ldd + i] = row(i)[d] as acc_t for i < n, d < D (row(i) = tile_row(src, src2, stride, n1, i)):
// a K (or V) tile loaded transposed. Columns i in [n, round_up(n, 16)) of dst may be overwritten
// with zeros (ldd >= that).
template <typename scalar_t, typename acc_t>
inline void load_transposed(const scalar_t* src, const scalar_t* src2, int64_t stride, int64_t n1, int64_t n,
                            int64_t D, acc_t* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float> && kVecSize == 16) {
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      const int64_t rows = std::min<int64_t>(16, n - i0);
      const bool plain = i0 + rows <= n1;  // no wrap inside this block
      const scalar_t* blk = src + i0 * stride;
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int64_t cols = std::min<int64_t>(16, D - d0);
        __m512 r[16];
        if (plain && rows == 16 && cols == 16) {
#pragma GCC unroll 16
          for (int64_t i = 0; i < 16; ++i) r[i] = load_f(blk + i * stride + d0);
        } else {
          for (int64_t i = 0; i < 16; ++i) {
            const scalar_t* p = tile_row(src, src2, stride, n1, i0 + i) + d0;
            r[i] = i < rows ? __m512(cols == 16 ? load_f(p) : load_f(p, cols)) : _mm512_setzero_ps();
          }
        }
        transpose16x16(r);
        for (int64_t c = 0; c < cols; ++c) _mm512_storeu_ps(dst + (d0 + c) * ldd + i0, r[c]);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* p = tile_row(src, src2, stride, n1, i);
    for (int64_t d = 0; d < D; ++d) dst[d * ldd + i] = static_cast<acc_t>(p[d]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bfloat16 Q K^T with AVX512-BF16 dot products (vdpbf16ps: exact bf16 products summed in float32,
// the same arithmetic class as converting to float and using FMAs), used when the CPU has them
// and D % 32 == 0. K is moved, not converted: a tile is transposed in 32-bit units, kp[p * kBK + i]
// holding the pair (k[i][2p], k[i][2p + 1]), half the shuffles of a float transpose.
// kp[p * kBK + i] = pair p of row(i) = tile_row(src, src2, stride, n1, i) (D bf16 values), i < n <= kBK,
// p < D / 2; columns [n, round_up(n, 16)) are zeroed.
inline void load_pairs_transposed(const c10::BFloat16* src, const c10::BFloat16* src2, int64_t stride, int64_t n1,
                                  int64_t n, int64_t D, uint32_t* kp) {
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n - i0);
    for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_castsi512_ps(_mm512_loadu_si512(tile_row(src, src2, stride, n1, i0 + i) + 2 * p0))
                        : _mm512_setzero_ps();
      transpose16x16(r);
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(reinterpret_cast<float*>(kp + (p0 + c) * kBK + i0), r[c]);
    }
  }
}

// C[i][0:16 NV] (+)= sum over pairs p < npairs of a[i * lda + p] . bp[p * ldb + 0:16 NV] for MR rows
// (vdpbf16ps): a holds bf16 pairs as float bit patterns (a pair broadcast is a plain vbroadcastss
// from memory), bp bf16 pairs as 32-bit words. Q K^T (a = Q pairs, bp = K pairs transposed) and
// P V (a = P rounded to bf16 pairs, bp = V pairs of consecutive keys, see load_v_pairs).
template <int MR, int NV, bool ACC>
__attribute__((target("avx512bf16"))) inline void dp_bf16_tile(const float* a, int64_t lda, const uint32_t* bp,
                                                             int64_t ldb, int64_t npairs, float* C, int64_t ldc) {
  __m512 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = ACC ? _mm512_loadu_ps(C + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp + p * ldb + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(a[i * lda + p]));
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], ai, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, c[i][j]);
}

// dp_bf16_tile over R rows (4 at a time).
template <int NV, bool ACC>
inline void dp_bf16_rows(int64_t R, const float* a, int64_t lda, const uint32_t* bp, int64_t ldb, int64_t npairs,
                         float* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) dp_bf16_tile<4, NV, ACC>(a + r * lda, lda, bp, ldb, npairs, C + r * ldc, ldc);
  switch (R - r) {
    case 3: dp_bf16_tile<3, NV, ACC>(a + r * lda, lda, bp, ldb, npairs, C + r * ldc, ldc); break;
    case 2: dp_bf16_tile<2, NV, ACC>(a + r * lda, lda, bp, ldb, npairs, C + r * ldc, ldc); break;
    case 1: dp_bf16_tile<1, NV, ACC>(a + r * lda, lda, bp, ldb, npairs, C + r * ldc, ldc); break;
    default: break;
  }
}

// S[r][0:64] for rows r < R (row stride kBK) from bf16 q rows (pairs, row stride D / 2).
inline void qk_bf16(int64_t R, int64_t D, const float* q, const uint32_t* kp, float* S) {
  static_assert(kBK == 64, "four vectors of keys per tile");
  dp_bf16_rows<4, false>(R, q, D / 2, kp, kBK, D / 2, S, kBK);
}

// V pairs of a tile (D % 32 == 0): for key pair p < ceil(n / 2) and each 32-column block d0,
// vp[p * D + d0 + 0:16] = unpacklo16(v[2p][d0:d0+32], v[2p+1][d0:d0+32]) and [16:32] the unpackhi
// (v[n] = 0 when n is odd). So word d0 + 16 h + 4 l + j of a pair row holds column
// d0 + 8 l + 4 h + j (l < 4 128-bit lanes, j < 4): P V computed with these rows comes out in that
// "pair order"; unpermute_pair_order restores it.
inline void load_v_pairs(const c10::BFloat16* src, const c10::BFloat16* src2, int64_t stride, int64_t n1,
                         int64_t n, int64_t D, uint32_t* vp) {
  for (int64_t p = 0; 2 * p < n; ++p) {
    const c10::BFloat16* ra = tile_row(src, src2, stride, n1, 2 * p);
    const bool has_b = 2 * p + 1 < n;
    const c10::BFloat16* rb = has_b ? tile_row(src, src2, stride, n1, 2 * p + 1) : ra;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __m512i va = _mm512_loadu_si512(ra + d0);
      const __m512i vb = has_b ? _mm512_loadu_si512(rb + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + p * D + d0, _mm512_unpacklo_epi16(va, vb));
      _mm512_storeu_si512(vp + p * D + d0 + 16, _mm512_unpackhi_epi16(va, vb));
    }
  }
}

// pp[0:np / 2] = the float row s[0:np] (np a multiple of 16) rounded to bf16, as pairs.
__attribute__((target("avx512bf16"))) inline void round_row_bf16(const float* s, int64_t np, float* pp) {
  int64_t k = 0;
  for (; k + 32 <= np; k += 32)
    _mm512_storeu_ps(pp + k / 2, (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + k + 16), _mm512_loadu_ps(s + k)));
  if (k < np) _mm256_storeu_ps(pp + k / 2, (__m256)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + k)));
}

// Q K^T on AMX (TDPBF16PS), when the CPU has it and the kernel lets this process use it: per
// 16-key block, S^T[key][r] = K[key][:] . Q[r][:] with A = the 16 cache rows of K as they are (no
// transpose) and B = Q^T in pair form (qk_amx_prepare), then S^T is transposed to S's rows.
// (The backward's dP = dO V^T is the same product.) cpu_use_amx(): AMX-BF16 present, the tile
// state granted to this process, and GPTOSS_EXT_NO_AMX not set; asked once.
inline bool cpu_use_amx() {
  static const bool ok = [] {
    if (getenv("GPTOSS_EXT_NO_AMX") != nullptr) return false;  // (so the tests cover the other paths)
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

struct AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles (each 16 rows x 64 bytes): qk_amx: 0 = S^T block (16 keys x 16 rows, float), 1 = K block
// (16 keys x 32 bf16), 2 = Q^T pairs (16 pairs x 16 rows); pv_amx: 1, 7 = A pairs, 2 = B pairs,
// 3..6 = four 16-column blocks of the output. Loaded per call (other code on the thread, e.g.
// oneDNN, may reconfigure).
__attribute__((target("amx-tile"))) inline void qk_amx_config() {
  // Static: the compiler does not see ldtilecfg read the memory, so a local's stores may be dropped.
  static const AmxConfig c = [] {
    AmxConfig x;
    for (int t = 0; t < 8; ++t) {
      x.colsb[t] = 64;
      x.rows[t] = 16;
    }
    return x;
  }();
  _tile_loadconfig(&c);
}

__attribute__((target("amx-tile"))) inline void qk_amx_release() { _tile_release(); }

// qt[(s * 16 + p) * 16 + r] = pair (q[r][32 s + 2 p], q[r][32 s + 2 p + 1]) for r < R <= 16 (0
// for r >= R); q: R rows of D / 2 pairs (as float bit patterns).
inline void qk_amx_prepare(const float* q, int64_t R, int64_t D, uint32_t* qt) {
  for (int64_t s = 0; s < D / 32; ++s) {
    __m512 r[16];
    for (int64_t i = 0; i < 16; ++i) r[i] = i < R ? _mm512_loadu_ps(q + i * (D / 2) + s * 16) : _mm512_setzero_ps();
    transpose16x16(r);
    for (int64_t p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(qt + (s * 16 + p) * 16), r[p]);
  }
}

// S[r][0:np] (row stride kBK, np = round_up(n, 16)) for r < R <= 16 from the n <= kBK key rows
// row(i) = tile_row(src, src2, stride, n1, i) (D bf16 each, D % 32 == 0). st: 16 * kBK floats,
// stage: 16 * D bf16 of scratch. qk_amx_config must be in effect.
__attribute__((target("amx-tile,amx-bf16"))) inline void qk_amx(const c10::BFloat16* src, const c10::BFloat16* src2,
                                                                int64_t stride, int64_t n1, int64_t n, int64_t D,
                                                                const uint32_t* qt, int64_t R, float* st,
                                                                c10::BFloat16* stage, float* S) {
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const c10::BFloat16* a = src + i0 * stride;
    int64_t lda = stride * 2;
    if (i0 + 16 > n1 || i0 + 16 > n) {  // partial block or a ring's wrap: stage the rows
      for (int64_t i = 0; i < 16; ++i) {
        if (i0 + i < n)
          std::memcpy(stage + i * D, tile_row(src, src2, stride, n1, i0 + i), D * 2);
        else
          std::memset(stage + i * D, 0, D * 2);
      }
      a = stage;
      lda = D * 2;
    }
    _tile_zero(0);
    for (int64_t s = 0; s < D / 32; ++s) {
      _tile_loadd(1, a + 32 * s, lda);
      _tile_loadd(2, qt + s * 256, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, st + i0 * 16, 64);
  }
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(st + (i0 + i) * 16);
    transpose16x16(r);
    for (int64_t i = 0; i < R; ++i) _mm512_storeu_ps(S + i * kBK + i0, r[i]);
  }
}

// pv_amx on one chunk of up to 64 output columns: c0[r][16 c + 0:16] (+)= ..., c < NC <= 4 in
// accumulator tile 3 + c; A pairs in tiles 1 (pp) and 7 (pp2, TWO), B in tile 2.
template <int NC, bool TWO>
__attribute__((target("amx-tile,amx-bf16"))) inline void pv_amx_chunk(const float* pp, const float* pp2,
                                                                      int64_t lda, const uint32_t* vp, int64_t D,
                                                                      int64_t nsteps, float* c0, int64_t ldc,
                                                                      bool load_c) {
  // C tiles: 16 rows x 16 columns each at c0 + 16 c (row stride ldc floats), loaded or zeroed
  if (load_c) {
    _tile_loadd(3, c0, ldc * 4);
    if (NC > 1) _tile_loadd(4, c0 + 16, ldc * 4);
    if (NC > 2) _tile_loadd(5, c0 + 32, ldc * 4);
    if (NC > 3) _tile_loadd(6, c0 + 48, ldc * 4);
  } else {
    _tile_zero(3);
    if (NC > 1) _tile_zero(4);
    if (NC > 2) _tile_zero(5);
    if (NC > 3) _tile_zero(6);
  }
  for (int64_t ks = 0; ks < nsteps; ++ks) {
    const uint32_t* b = vp + ks * 16 * D;
    _tile_loadd(1, pp + ks * 16, lda * 4);
    if (TWO) _tile_loadd(7, pp2 + ks * 16, lda * 4);
#define GPTOSS_PV_STEP(C, T)                \
    _tile_loadd(2, b + 16 * (C), D * 4);    \
    _tile_dpbf16ps(T, 1, 2);                \
    if (TWO) _tile_dpbf16ps(T, 7, 2);
    GPTOSS_PV_STEP(0, 3)
    if (NC > 1) { GPTOSS_PV_STEP(1, 4) }
    if (NC > 2) { GPTOSS_PV_STEP(2, 5) }
    if (NC > 3) { GPTOSS_PV_STEP(3, 6) }
#undef GPTOSS_PV_STEP
  }
  _tile_stored(3, c0, ldc * 4);
  if (NC > 1) _tile_stored(4, c0 + 16, ldc * 4);
  if (NC > 2) _tile_stored(5, c0 + 32, ldc * 4);
  if (NC > 3) _tile_stored(6, c0 + 48, ldc * 4);
}

// o[r][0:D] += sum over key pairs p < npairs of pp[r][p] . vp[p][0:D] (pair order) for r < R <= 16
// on AMX: A = P's bf16 pairs (row stride lda words; kBK / 2 in the forward), B = V pairs
// (load_v_pairs); with pp2 (same layout) its product is added too (the
// backward's hi and lo parts: dQ += dS K, dK += dS^T Q, dV += P^T dO). Pairs [npairs,
// round_up(npairs, 16)) of pp, pp2 and vp are zeroed first (stale scratch must not enter the
// sums). ot: 16 x 64 floats of scratch (R < 16: the sums pass through it; R = 16 accumulates
// into o's rows in the tiles). Up to 64 output columns at a time, in four accumulator tiles
// (independent sums hide the tile product's latency). qk_amx_config must be in effect.
__attribute__((target("amx-tile,amx-bf16"))) inline void pv_amx(float* pp, float* pp2, int64_t R, uint32_t* vp,
                                                                int64_t npairs, int64_t D, float* ot, float* o,
                                                                int64_t ldo, int64_t lda = kBK / 2) {
  const int64_t nsteps = (npairs + 15) / 16;
  if (npairs % 16 != 0) {
    for (int64_t r = 0; r < 16; ++r) {
      std::fill(pp + r * lda + npairs, pp + r * lda + nsteps * 16, 0.f);
      if (pp2 != nullptr) std::fill(pp2 + r * lda + npairs, pp2 + r * lda + nsteps * 16, 0.f);
    }
    std::fill(vp + npairs * D, vp + nsteps * 16 * D, 0u);
  }
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t nc = std::min<int64_t>(4, (D - d0) / 16);
    // R = 16: accumulate into o's rows in the tiles; else into ot (16 x 64), then add R rows
    float* c0 = R == 16 ? o + d0 : ot;
    const int64_t ldc = R == 16 ? ldo : 64;
    const bool two = pp2 != nullptr;
    const uint32_t* b = vp + d0;
    switch (nc * 2 + (two ? 1 : 0)) {
      case 2: pv_amx_chunk<1, false>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 3: pv_amx_chunk<1, true>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 4: pv_amx_chunk<2, false>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 5: pv_amx_chunk<2, true>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 6: pv_amx_chunk<3, false>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 7: pv_amx_chunk<3, true>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      case 8: pv_amx_chunk<4, false>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
      default: pv_amx_chunk<4, true>(pp, pp2, lda, b, D, nsteps, c0, ldc, R == 16); break;
    }
    if (R == 16) continue;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < nc; ++c)
        _mm512_storeu_ps(o + r * ldo + d0 + 16 * c,
                         _mm512_add_ps(_mm512_loadu_ps(o + r * ldo + d0 + 16 * c), _mm512_loadu_ps(ot + r * 64 + 16 * c)));
  }
}

// Row x[0:D] from pair order (load_v_pairs) back to column order.
inline void unpermute_pair_order(float* x, int64_t D) {
  float t[32];
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    std::memcpy(t, x + d0, sizeof(t));
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 4; ++l)
        for (int j = 0; j < 4; ++j) x[d0 + 8 * l + 4 * h + j] = t[16 * h + 4 * l + j];
  }
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi), 16 lanes, as 32-bit words holding the bf16
// in their low 16 bits: together they carry x to ~2^-17 relative (two bf16 products summed in
// float are then nearly a float product).
__attribute__((target("avx512bf16"))) inline void split_bf16(__m512 x, __m512i& hi, __m512i& lo) {
  hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  const __m512 rest = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
  lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(rest));
}

// Rows r < rows of s (np floats each, row stride lds, np % 16 == 0) split into bf16 hi and lo
// parts as pv_amx's pp rows: hi[r * ldp + p] = (s[r][2p], s[r][2p + 1]) for p < np / 2.
__attribute__((target("avx512bf16"))) inline void split_rows_bf16(const float* s, int64_t lds, int64_t rows,
                                                                  int64_t np, float* hi, float* lo, int64_t ldp) {
  const __m512i idx_even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i idx_odd = _mm512_add_epi32(idx_even, _mm512_set1_epi32(1));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < np; k += 32) {  // np % 16 == 0; 16 pairs per step (a half step at the end)
      const __m512 a = _mm512_loadu_ps(s + r * lds + k);
      const __m512 b = k + 16 < np ? _mm512_loadu_ps(s + r * lds + k + 16) : _mm512_setzero_ps();
      __m512i ha, la, hb, lb;
      split_bf16(_mm512_permutex2var_ps(a, idx_even, b), ha, la);  // elements 2p
      split_bf16(_mm512_permutex2var_ps(a, idx_odd, b), hb, lb);   // elements 2p + 1
      const __mmask16 m = k + 16 < np ? 0xFFFF : 0x00FF;
      _mm512_mask_storeu_epi32(hi + r * ldp + k / 2, m, _mm512_or_si512(ha, _mm512_slli_epi32(hb, 16)));
      _mm512_mask_storeu_epi32(lo + r * ldp + k / 2, m, _mm512_or_si512(la, _mm512_slli_epi32(lb, 16)));
    }
}

// The transpose of the same: for key (column) i < np and row pair j < npr,
// hi[i * ldp + j] = (s[2j][i], s[2j + 1][i]) split as above; rows >= `rows` read as 0. np % 16 ==
// 0, npr % 16 == 0.
__attribute__((target("avx512bf16"))) inline void split_cols_bf16(const float* s, int64_t lds, int64_t rows,
                                                                  int64_t np, int64_t npr, float* hi, float* lo,
                                                                  int64_t ldp) {
  for (int64_t i0 = 0; i0 < np; i0 += 16)
    for (int64_t j0 = 0; j0 < npr; j0 += 16) {
      __m512 h[16], l[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t r0 = 2 * (j0 + j);
        const __m512 a = r0 < rows ? _mm512_loadu_ps(s + r0 * lds + i0) : _mm512_setzero_ps();
        const __m512 b = r0 + 1 < rows ? _mm512_loadu_ps(s + (r0 + 1) * lds + i0) : _mm512_setzero_ps();
        __m512i ha, la, hb, lb;
        split_bf16(a, ha, la);
        split_bf16(b, hb, lb);
        h[j] = _mm512_castsi512_ps(_mm512_or_si512(ha, _mm512_slli_epi32(hb, 16)));
        l[j] = _mm512_castsi512_ps(_mm512_or_si512(la, _mm512_slli_epi32(lb, 16)));
      }
      transpose16x16(h);
      transpose16x16(l);
      for (int64_t i = 0; i < 16; ++i) {
        _mm512_storeu_ps(hi + (i0 + i) * ldp + j0, h[i]);
        _mm512_storeu_ps(lo + (i0 + i) * ldp + j0, l[i]);
      }
    }
}
#endif

// Run f(unit, scratch) for every unit in [0, n), handing units out dynamically so that a busy core
// does not hold up the rest. `make_scratch()` returns one thread's scratch (a value or a reference
// to a per-thread one). `work` (multiply-adds,
// roughly) below kMinParallelWork runs on the calling thread: waking the pool costs more.
constexpr int64_t kMinParallelWork = 1 << 20;

template <typename MakeScratch, typename F>
void parallel_units(int64_t n, int64_t work, MakeScratch&& make_scratch, F&& f) {
  if (n <= 0) return;
  if (work < kMinParallelWork || n == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    auto&& scratch = make_scratch();
    for (int64_t u = 0; u < n; ++u) f(u, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    auto&& scratch = make_scratch();
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) f(u, scratch);
  });
}

// ----------------------------------------------------------------------------- forward

// Layout of one forward problem. Query i of sequence b sits at position pos0[b] + i; key
// position p of sequence b (valid for p in [kv_begin[b], kv_end[b])) lives in row
// (ring ? p % kv_rows : p) of k/v.
template <typename scalar_t, typename acc_t>
struct FwdProblem {
  const scalar_t* q;  // [B, Tq, Hq, D] contiguous
  const scalar_t* k;  // strided [B, kv_rows, Hkv, D], last dim contiguous
  const scalar_t* v;
  int64_t ks[3], vs[3];  // strides of k and v over (b, row, head)
  int64_t B, Tq, Hq, Hkv, D, kv_rows;
  const acc_t* sinks;  // [Hq] or nullptr
  acc_t scale;
  int64_t window;
  const int64_t* pos0;
  const int64_t* kv_begin;
  const int64_t* kv_end;
  bool ring;
  scalar_t* out;  // [B, Tq, Hq, D] contiguous
  acc_t* lse;     // [B, Hq, Tq]

  int64_t G() const { return Hq / Hkv; }
  int64_t slot(int64_t p) const { return ring ? p % kv_rows : p; }
  const scalar_t* krow(int64_t b, int64_t p, int64_t h) const {
    return k + b * ks[0] + slot(p) * ks[1] + h * ks[2];
  }
  const scalar_t* vrow(int64_t b, int64_t p, int64_t h) const {
    return v + b * vs[0] + slot(p) * vs[1] + h * vs[2];
  }
  // Visible key positions of a query at position pos: [key_lo, key_hi).
  int64_t key_lo(int64_t b, int64_t pos) const { return std::max(kv_begin[b], attn_first_visible(pos, window)); }
  int64_t key_hi(int64_t b, int64_t pos) const { return std::min(kv_end[b], pos + 1); }
};

// One thread's forward scratch, kept per thread and reused across calls (decode calls are short:
// no allocation per call). Sized for `rows` query rows of a unit, head dim D (padded Dp).
template <typename acc_t>
struct FwdScratch {
  std::vector<acc_t> qb, s, kt, vb, o, m, l;
  std::vector<float> qp;     // bf16 pairs of the unit's Q rows, as float bit patterns (qk_bf16)
  std::vector<uint32_t> kp;  // bf16 pairs of a K tile, transposed (load_pairs_transposed)
  std::vector<uint32_t> vp;  // bf16 pairs of a V tile (load_v_pairs)
  std::vector<float> pp;     // P rows rounded to bf16 pairs (round_row_bf16), or their hi part (AMX)
  std::vector<float> pl;     // P rows' lo part (AMX: split_rows_bf16)
  std::vector<uint32_t> qt;  // Q^T pairs of the unit's heads (qk_amx_prepare)
  std::vector<float> st;     // S^T of a tile (qk_amx)
  std::vector<c10::BFloat16> stage;  // staged K rows (qk_amx)
  static FwdScratch& get(int64_t rows, int64_t D, int64_t Dp) {
    thread_local FwdScratch sc;
    const auto grow = [](std::vector<acc_t>& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n, acc_t(0));
    };
    grow(sc.qb, rows * D);
    grow(sc.s, rows * kBK);
    grow(sc.kt, D * kBK);
    grow(sc.vb, kBK * Dp);
    grow(sc.o, rows * Dp);
    grow(sc.m, rows);
    grow(sc.l, rows);
    if (static_cast<int64_t>(sc.qp.size()) < rows * D / 2) sc.qp.resize(rows * D / 2);
    if (static_cast<int64_t>(sc.kp.size()) < D / 2 * kBK) sc.kp.resize(D / 2 * kBK);
    if (static_cast<int64_t>(sc.vp.size()) < kBK / 2 * Dp) sc.vp.resize(kBK / 2 * Dp);
    if (static_cast<int64_t>(sc.pp.size()) < round_up(rows, 16) * kBK / 2) {  // whole 16-row AMX groups
      sc.pp.resize(round_up(rows, 16) * kBK / 2);
      sc.pl.resize(round_up(rows, 16) * kBK / 2);
    }
    // heads x groups x D / 2 x 16 words, heads x groups * 16 <= 16 * rows
    if (static_cast<int64_t>(sc.qt.size()) < rows * D * 8) sc.qt.resize(rows * D * 8);
    static_assert(kBK >= 64, "st doubles as pv_amx's 16 x 64 scratch");
    if (static_cast<int64_t>(sc.st.size()) < 16 * kBK) sc.st.resize(16 * kBK);
    if (static_cast<int64_t>(sc.stage.size()) < 16 * D) sc.stage.resize(16 * D);
    return sc;
  }
};

// Runs the query rows of positions [t0, t1) of sequence b and kv heads [h0, h1) over the key
// tiles [tile_lo, tile_hi); tile i covers positions [lo + i * kBK, lo + (i + 1) * kBK) counted from
// the first position lo any of the rows sees (a window of W keys takes ceil(W / kBK) tiles, also
// when it is not aligned). Scratch row (hh, t, g) = (hh * (t1 - t0) + t - t0) * G + g holds query
// head (h0 + hh) * G + g at position t. Per tile the heads run back to back, so with all kv heads
// in one unit (decode) the tile's cache rows [kBK, Hkv, D] are streamed once, contiguously.
// Updates the unnormalised state (m, l, o) in the scratch, which the caller initialises (o to 0:
// the bf16 pair path accumulates o in pair order and restores column order at the end).
template <typename scalar_t, typename acc_t, bool FAST>
void fwd_rows(const FwdProblem<scalar_t, acc_t>& P, int64_t b, int64_t h0, int64_t h1, int64_t t0, int64_t t1,
              int64_t tile_lo, int64_t tile_hi, FwdScratch<acc_t>& sc) {
  constexpr int64_t VS = AVec<acc_t>::size();
  const int64_t G = P.G(), D = P.D, Dp = round_up(D, VS), R = (t1 - t0) * G;  // R rows per head
  const int64_t lo = P.key_lo(b, P.pos0[b] + t0), hi = P.key_hi(b, P.pos0[b] + t1 - 1);
  const int64_t ng = (R + 15) / 16;  // AMX row groups of a head
#if defined(CPU_CAPABILITY_AVX512)
  // bf16 products (bf16 operands, float sums): on AMX tiles for any number of rows (16-row groups
  // per head), with P split into bf16 hi + lo parts for P V (near-float accuracy; P rounded to bf16
  // alone, as a GPU's MMA takes it, pushed gradients past the tests' bound at head dim 32), where
  // the CPU and kernel allow; else with vdpbf16ps (P rounded to bf16) for few rows per head
  // (decode: there K's conversion and transpose cost as much as the products, and the pair form
  // halves them), while the many rows of a prefill keep the float FMA GEMM. GPTOSS_EXT_NO_AMX set in the environment keeps AMX off (so that the tests
  // cover both paths on an AMX machine).
  const bool bf16_ok = std::is_same_v<scalar_t, c10::BFloat16> && D % 32 == 0 && cpu_has_avx512_bf16();
  const bool use_amx = bf16_ok && cpu_use_amx();
  const bool dp_bf16 = use_amx || (bf16_ok && R <= 32);
#else
  constexpr bool dp_bf16 = false, use_amx = false;
#endif
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* src = P.q + ((b * P.Tq + t) * P.Hq + h * G) * D;
      const int64_t row = (h - h0) * R + (t - t0) * G;
      if (dp_bf16)
        std::memcpy(sc.qp.data() + row * D / 2, src, G * D * sizeof(scalar_t));
      else
        load_row(src, sc.qb.data() + row * D, G * D);
    }
#if defined(CPU_CAPABILITY_AVX512)
  if (use_amx) {
    for (int64_t hh = 0; hh < h1 - h0; ++hh)
      for (int64_t g = 0; g < ng; ++g)
        qk_amx_prepare(sc.qp.data() + (hh * R + 16 * g) * D / 2, std::min<int64_t>(16, R - 16 * g), D,
                       sc.qt.data() + (hh * ng + g) * D / 2 * 16);
    qk_amx_config();
  }
#endif
  for (int64_t tile = tile_lo; tile < tile_hi; ++tile) {
    const int64_t a = lo + tile * kBK, e = std::min(hi, a + kBK);
    if (a >= e) continue;
    const int64_t n = e - a, np = round_up(n, VS);
    // A tile is "interior" when every row sees all of it; else mask per row.
    const bool interior = a >= P.key_lo(b, P.pos0[b] + t1 - 1) && e <= P.key_hi(b, P.pos0[b] + t0);
    // The tile's cache rows: slots [sa, sa + n1) then, past a ring's wrap, [0, n - n1); the next
    // tile's rows (prefetched) likewise from slot sn.
    const int64_t sa = P.slot(a), n1 = std::min(n, P.kv_rows - sa);
    const int64_t n_next = tile + 1 < tile_hi ? std::max<int64_t>(0, std::min(hi, e + kBK) - e) : 0;
    const int64_t sn = n_next > 0 ? P.slot(e) : 0;
    const int64_t kst = P.ks[1], vst = P.vs[1];
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hh = h - h0;
      const scalar_t* kh = P.k + b * P.ks[0] + h * P.ks[2];
      const scalar_t* vh = P.v + b * P.vs[0] + h * P.vs[2];
      // Prefetch this head's rows of the next tile: one tile of all the unit's heads ahead.
      for (int64_t i = 0; i < n_next; ++i) {
        const int64_t slot = sn + i < P.kv_rows ? sn + i : sn + i - P.kv_rows;
        for (int64_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(kh + slot * kst) + off);
          __builtin_prefetch(reinterpret_cast<const char*>(vh + slot * vst) + off);
        }
      }
      if (!dp_bf16) load_transposed(kh + sa * kst, kh, kst, n1, n, D, sc.kt.data(), kBK);
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (dp_bf16 && !use_amx) load_pairs_transposed(kh + sa * kst, kh, kst, n1, n, D, sc.kp.data());
      }
#endif
      const acc_t* vt = sc.vb.data();
      int64_t ldv = Dp;
      if (std::is_same_v<scalar_t, acc_t> && D == Dp && n1 == n) {  // float rows used in place
        vt = reinterpret_cast<const acc_t*>(vh + sa * vst);
        ldv = vst;
      } else if (!dp_bf16) {
        for (int64_t i = 0; i < n; ++i)
          load_row(vh + (i < n1 ? sa + i : i - n1) * vst, sc.vb.data() + i * Dp, D);
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (dp_bf16) load_v_pairs(vh + sa * vst, vh, vst, n1, n, D, sc.vp.data());
      }
#endif
      acc_t* S = sc.s.data();
      acc_t* m = sc.m.data() + hh * R;
      acc_t* l = sc.l.data() + hh * R;
      acc_t* o = sc.o.data() + hh * R * Dp;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (use_amx) {
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
            for (int64_t g = 0; g < ng; ++g)
              qk_amx(kh + sa * kst, kh, kst, n1, n, D, sc.qt.data() + (hh * ng + g) * D / 2 * 16,
                     std::min<int64_t>(16, R - 16 * g), sc.st.data(), sc.stage.data(), S + 16 * g * kBK);
        } else if (dp_bf16) {
          qk_bf16(R, D, sc.qp.data() + hh * R * D / 2, sc.kp.data(), S);
        }
      }
#endif
      if (!dp_bf16) gemm<acc_t, false, false>(R, np, D, sc.qb.data() + hh * R * D, D, sc.kt.data(), kBK, S, kBK);
      for (int64_t r = 0; r < R; ++r) {
        acc_t* sr = S + r * kBK;
        int64_t ra = 0, re = n;
        if (!interior) {
          const int64_t pos = P.pos0[b] + t0 + r / G;
          ra = std::clamp<int64_t>(P.key_lo(b, pos) - a, 0, n);
          re = std::clamp<int64_t>(P.key_hi(b, pos) - a, 0, n);
          if (ra >= re) {  // nothing visible in this tile: P row 0, state unchanged
            std::fill(sr, sr + np, acc_t(0));
            continue;
          }
          std::fill(sr, sr + ra, attn_neg_inf<acc_t>());
        }
        std::fill(sr + re, sr + np, attn_neg_inf<acc_t>());
        // (when the max does not rise, alpha is exactly 1: skip its exp, one per row and tile)
        const acc_t block_max = row_max(sr, np) * P.scale;
        const acc_t alpha = block_max > m[r] ? softmax_update_max<false>(m[r], block_max) : acc_t(1);
        const acc_t sum = exp_row<acc_t, FAST>(sr, np, P.scale, softmax_offset(m[r]));
        l[r] = l[r] * alpha + sum;
        if (alpha != acc_t(1)) scale_row(o + r * Dp, alpha, Dp);
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (dp_bf16) {
          // P V with bf16 products, sums in float: on AMX with P as bf16 hi + lo, else (vdpbf16ps)
          // with P rounded to bf16, as a GPU's P V MMA takes it.
          float* pp = sc.pp.data();
          const int64_t npairs = (n + 1) / 2;
          if (use_amx) {  // P as bf16 hi + lo parts: P V to near-float accuracy (two tile passes)
            split_rows_bf16(S, kBK, R, np, pp, sc.pl.data(), kBK / 2);
            for (int64_t g = 0; g < ng; ++g)
              pv_amx(pp + 16 * g * (kBK / 2), sc.pl.data() + 16 * g * (kBK / 2), std::min<int64_t>(16, R - 16 * g),
                     sc.vp.data(), npairs, D, sc.st.data(), o + 16 * g * Dp, Dp);
            continue;
          }
          for (int64_t r = 0; r < R; ++r) round_row_bf16(S + r * kBK, np, pp + r * (kBK / 2));
          int64_t c0 = 0;
          for (; c0 + 64 <= D; c0 += 64)
            dp_bf16_rows<4, true>(R, pp, kBK / 2, sc.vp.data() + c0, D, npairs, o + c0, Dp);
          if (c0 < D) dp_bf16_rows<2, true>(R, pp, kBK / 2, sc.vp.data() + c0, D, npairs, o + c0, Dp);
        }
      }
#endif
      if (!dp_bf16) gemm<acc_t, false, true>(R, Dp, n, S, kBK, vt, ldv, o, Dp);
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dp_bf16)
      for (int64_t r = 0; r < (h1 - h0) * R; ++r) unpermute_pair_order(sc.o.data() + r * Dp, D);
  }
  if (use_amx) qk_amx_release();
#endif
}

// Most query rows (kv heads x positions x group) one forward unit holds.
constexpr int64_t kMaxUnitRows = 256;

template <typename scalar_t, typename acc_t, bool FAST>
void attention_fwd_impl(const FwdProblem<scalar_t, acc_t>& P) {
  constexpr int64_t VS = AVec<acc_t>::size();
  const int64_t G = P.G(), D = P.D, Dp = round_up(D, VS);
  const int64_t BQ = std::clamp<int64_t>(kRowsTarget / G, 1, std::max<int64_t>(P.Tq, 1));
  const int64_t nqb = (P.Tq + BQ - 1) / BQ, R = BQ * G;
  // kv heads per unit: a single query block (decode, short prefill) takes as many of the
  // sequence's kv heads as fit kMaxUnitRows, so a unit reads whole contiguous cache rows rather
  // than one head's slice of each; longer prefills run one head per unit (more units).
  int64_t HB = 1;
  if (nqb == 1) {
    HB = std::max<int64_t>(1, std::min(P.Hkv, kMaxUnitRows / std::max<int64_t>(R, 1)));
    while (P.Hkv % HB != 0) --HB;
  }
  const int64_t nhb = P.Hkv / HB, UR = HB * R;  // UR: scratch rows of a unit
  const int64_t base_units = P.B * nhb * nqb;
  if (base_units == 0) return;
  // Split-K chunks when there are too few units to fill the threads (single query block only).
  int64_t max_keys = 0;  // most keys a unit's rows see
  for (int64_t b = 0; b < P.B; ++b) {
    const int64_t held = P.kv_end[b] - P.kv_begin[b];
    max_keys = std::max(max_keys, P.window > 0 ? std::min(held, P.window + BQ - 1) : held);
  }
  int64_t C = 1;
  if (nqb == 1 && base_units < 2 * at::get_num_threads())
    C = std::clamp<int64_t>((4 * at::get_num_threads() + base_units - 1) / base_units, 1,
                            std::max<int64_t>(1, max_keys / kMinSplitKeys));
  std::vector<acc_t> part;  // per (base unit, chunk): UR x (m, l, o[Dp])
  const int64_t part_stride = UR * (Dp + 2);
  if (C > 1) part.resize(base_units * C * part_stride);

  // Unit bu: query block qb (last first: under a causal mask it sees the most keys), sequence b,
  // kv heads [h0, h0 + HB).
  struct Unit {
    int64_t b, h0, t0, t1;
  };
  const auto unit = [&](int64_t bu) {
    const int64_t qb = nqb - 1 - bu / (P.B * nhb), bh = bu % (P.B * nhb);
    const int64_t t0 = qb * BQ;
    return Unit{bh / nhb, (bh % nhb) * HB, t0, std::min(P.Tq, t0 + BQ)};
  };
  const auto row_init = [&](FwdScratch<acc_t>& sc, const Unit& U, bool with_sink) {
    const int64_t nrows = HB * (U.t1 - U.t0) * G;
    for (int64_t r = 0; r < nrows; ++r) {
      const bool has = with_sink && P.sinks != nullptr;
      const int64_t hq = (U.h0 + r / ((U.t1 - U.t0) * G)) * G + r % G;
      softmax_init(has, has ? P.sinks[hq] : acc_t(0), sc.m[r], sc.l[r]);
    }
    std::fill(sc.o.begin(), sc.o.begin() + nrows * Dp, acc_t(0));
  };
  const auto write_out = [&](FwdScratch<acc_t>& sc, const Unit& U) {
    const int64_t nt = U.t1 - U.t0;
    for (int64_t r = 0; r < HB * nt * G; ++r) {
      const int64_t t = U.t0 + r / G % nt, hq = (U.h0 + r / (nt * G)) * G + r % G;
      acc_t inv_l, lse;
      const bool has_sink = P.sinks != nullptr;
      softmax_finalize<false>(sc.m[r], sc.l[r], has_sink, has_sink ? P.sinks[hq] : acc_t(0), inv_l, lse);
      store_row(sc.o.data() + r * Dp, inv_l, P.out + ((U.b * P.Tq + t) * P.Hq + hq) * D, D);
      P.lse[(U.b * P.Hq + hq) * P.Tq + t] = lse;
    }
  };
  const auto make_scratch = [&]() -> FwdScratch<acc_t>& { return FwdScratch<acc_t>::get(UR, D, Dp); };

  int64_t span = 0;  // keys per query row, for the work estimate
  for (int64_t b = 0; b < P.B; ++b)
    span += P.window > 0 ? std::min(P.window, P.kv_end[b] - P.kv_begin[b]) : P.kv_end[b] - P.kv_begin[b];
  const int64_t work = 2 * span * P.Tq * P.Hq * D;
  parallel_units(base_units * C, work, make_scratch, [&](int64_t u, FwdScratch<acc_t>& sc) {
    const int64_t c = u % C, bu = u / C;
    const Unit U = unit(bu);
    const int64_t lo = P.key_lo(U.b, P.pos0[U.b] + U.t0), hi = P.key_hi(U.b, P.pos0[U.b] + U.t1 - 1);
    const int64_t ntiles = lo < hi ? (hi - lo + kBK - 1) / kBK : 0;
    row_init(sc, U, C == 1);
    fwd_rows<scalar_t, acc_t, FAST>(P, U.b, U.h0, U.h0 + HB, U.t0, U.t1, ntiles * c / C, ntiles * (c + 1) / C,
                                    sc);
    if (C == 1) {
      write_out(sc, U);
    } else {
      acc_t* dst = part.data() + (bu * C + c) * part_stride;
      for (int64_t r = 0; r < HB * (U.t1 - U.t0) * G; ++r) {
        dst[r * (Dp + 2)] = sc.m[r];
        dst[r * (Dp + 2) + 1] = sc.l[r];
        std::copy(sc.o.begin() + r * Dp, sc.o.begin() + (r + 1) * Dp, dst + r * (Dp + 2) + 2);
      }
    }
  });
  if (C == 1) return;
  // Merge the chunks (partials without the sink) of each base unit in chunk order; the sink joins
  // at write_out (softmax_finalize).
  parallel_units(base_units, base_units * C * UR * Dp, make_scratch, [&](int64_t bu, FwdScratch<acc_t>& sc) {
    const Unit U = unit(bu);
    const int64_t nrows = HB * (U.t1 - U.t0) * G;
    row_init(sc, U, true);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* src = part.data() + (bu * C + c) * part_stride;
      for (int64_t r = 0; r < nrows; ++r) {
        const acc_t* pr = src + r * (Dp + 2);
        acc_t a1, a2;
        softmax_combine<false>(sc.m[r], sc.l[r], pr[0], pr[1], a1, a2);
        using V = AVec<acc_t>;
        const V va1(a1), va2(a2);
        acc_t* o = sc.o.data() + r * Dp;
        for (int64_t i = 0; i < Dp; i += VS)
          at::vec::fmadd(V::loadu(o + i), va1, V::loadu(pr + 2 + i) * va2).store(o + i);
      }
    }
    write_out(sc, U);
  });
}

template <typename acc_t>
const acc_t* sinks_ptr(const at::Tensor& s) {
  return s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
}

// The bf16/fp16 paths use the fast exp (see vexp).
template <typename scalar_t, typename acc_t>
void run_fwd(FwdProblem<scalar_t, acc_t>& P) {
  constexpr bool fast = !std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>;
  attention_fwd_impl<scalar_t, acc_t, fast>(P);
}

// k/v as strided row sources: last dim contiguous, else a contiguous copy.
at::Tensor rows_view(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::Tensor sinks_acc(const c10::optional<at::Tensor>& sinks, c10::ScalarType acc) {
  if (!sinks.has_value() || !sinks->defined()) return at::Tensor();
  return sinks->to(acc).contiguous();
}

void attention_forward_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& sinks, double sm_scale, int64_t window,
                              const std::vector<int64_t>& pos0, const std::vector<int64_t>& kv_begin,
                              const std::vector<int64_t>& kv_end, bool ring, at::Tensor& out,
                              at::Tensor& lse) {
  const auto fill = [&](auto& P) {
    P.B = q.size(0);
    P.Tq = q.size(1);
    P.Hq = q.size(2);
    P.D = q.size(3);
    P.Hkv = k.size(2);
    P.kv_rows = k.size(1);
    for (int i = 0; i < 3; ++i) {
      P.ks[i] = k.stride(i);
      P.vs[i] = v.stride(i);
    }
    P.window = window;
    P.pos0 = pos0.data();
    P.kv_begin = kv_begin.data();
    P.kv_end = kv_end.data();
    P.ring = ring;
  };
  if (q.scalar_type() == at::kDouble) {
    FwdProblem<double, double> P;
    fill(P);
    P.q = q.const_data_ptr<double>();
    P.k = k.const_data_ptr<double>();
    P.v = v.const_data_ptr<double>();
    P.sinks = sinks_ptr<double>(sinks);
    P.scale = sm_scale;
    P.out = out.mutable_data_ptr<double>();
    P.lse = lse.mutable_data_ptr<double>();
    run_fwd(P);
    return;
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "attention", [&] {
    FwdProblem<scalar_t, float> P;
    fill(P);
    P.q = q.const_data_ptr<scalar_t>();
    P.k = k.const_data_ptr<scalar_t>();
    P.v = v.const_data_ptr<scalar_t>();
    P.sinks = sinks_ptr<float>(sinks);
    P.scale = static_cast<float>(sm_scale);
    P.out = out.mutable_data_ptr<scalar_t>();
    P.lse = lse.mutable_data_ptr<float>();
    run_fwd(P);
  });
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                             const at::Tensor& v_in, const c10::optional<at::Tensor>& sinks,
                                             double sm_scale, int64_t window, int64_t q_offset) {
  check_attention(q_in, k_in, v_in, sinks, sm_scale, window, q_offset);
  const at::Tensor q = q_in.contiguous(), k = rows_view(k_in), v = rows_view(v_in);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), Tk = k.size(1);
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(acc));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const std::vector<int64_t> pos0(B, q_offset), kv_begin(B, 0), kv_end(B, Tk);
  attention_forward_common(q, k, v, sinks_acc(sinks, acc), sm_scale, window, pos0, kv_begin, kv_end,
                           false, out, lse);
  return {out, lse};
}

// ---------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct BwdProblem {
  const scalar_t *q, *k, *v, *dout, *out;  // contiguous; q/dout/out [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]
  const acc_t* lse;                        // [B, Hq, Tq]
  const acc_t* sinks;                      // [Hq] or nullptr
  int64_t B, Tq, Tk, Hq, Hkv, D, window, q_offset;
  acc_t scale;
  scalar_t *dk, *dv;  // [B, Tk, Hkv, D]
  int64_t G() const { return Hq / Hkv; }
};

template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> kt, vt, kn, dk, dv, qb, dob, p, ds;
  // bf16 on AMX (S and dP): the block's Q and dO rows as bf16 pairs (float bit patterns), their
  // transposed 16-row groups (qk_amx_prepare), S^T scratch and staged key rows (qk_amx).
  std::vector<float> qp, dop;
  std::vector<uint32_t> qt, dot;
  std::vector<float> st;
  std::vector<c10::BFloat16> stage;
  // and for dQ += dS K, dV += P^T dO, dK += dS^T Q: K pairs of consecutive keys, dO and Q pairs of
  // consecutive rows (load_v_pairs), dS rows and P^T, dS^T split into bf16 hi and lo pair rows.
  std::vector<uint32_t> kvp, dopp, qpp;
  std::vector<float> dsh, dsl, pth, ptl, dsth, dstl, ot;
  BwdScratch(int64_t rows, int64_t D, int64_t Dp, bool amx)
      : kt(amx ? 0 : D * kBK, acc_t(0)), vt(amx ? 0 : D * kBK, acc_t(0)), kn(amx ? 0 : kBK * Dp, acc_t(0)),
        dk(kBK * Dp), dv(kBK * Dp), qb(amx ? 0 : rows * Dp, acc_t(0)), dob(amx ? 0 : rows * Dp, acc_t(0)),
        p(rows * kBK), ds(rows * kBK) {
    if (amx) {
      qp.resize(rows * D / 2);
      dop.resize(rows * D / 2);
      qt.resize(round_up(rows, 16) * D / 2);
      dot.resize(round_up(rows, 16) * D / 2);
      st.resize(16 * kBK);
      stage.resize(16 * D);
      const int64_t npr = round_up((rows + 1) / 2, 16);  // row pairs, padded
      kvp.resize(kBK / 2 * D);
      dopp.resize(npr * D);
      qpp.resize(npr * D);
      for (auto* v : {&dsh, &dsl}) v->resize(round_up(rows, 16) * kBK / 2);
      for (auto* v : {&pth, &ptl, &dsth, &dstl}) v->resize(kBK * npr);
      ot.resize(16 * 64);
    }
  }
};

// Row-major per (b, kv head) "row" layout used by the backward's buffers: row (t, g) of kv head h
// is ((b * Hkv + h) * Tq + t) * G + g.
template <typename scalar_t, typename acc_t, bool FAST>
void attention_bwd_impl(const BwdProblem<scalar_t, acc_t>& P, acc_t* dq_part, int64_t C, acc_t* dsinks) {
  constexpr int64_t VS = AVec<acc_t>::size();
  const int64_t B = P.B, Tq = P.Tq, Tk = P.Tk, Hq = P.Hq, Hkv = P.Hkv, D = P.D, G = P.G();
  const int64_t Dp = round_up(D, VS), nrows = B * Tq * Hq;
  // 1. Per row: Di = rowsum(dO * O), lse for the backward, in the row layout.
  std::vector<acc_t> Drow(nrows), Lrow(nrows);
  at::parallel_for(0, B * Tq, std::max<int64_t>(1, (1 << 18) / (Hq * D)), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> a(D), o(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Tq, t = p % Tq;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        load_row(P.dout + (p * Hq + hq) * D, a.data(), D);
        load_row(P.out + (p * Hq + hq) * D, o.data(), D);
        acc_t s = 0;
        for (int64_t i = 0; i < D; ++i) s += a[i] * o[i];
        const int64_t row = ((b * Hkv + hq / G) * Tq + t) * G + hq % G;
        Drow[row] = s;
        Lrow[row] = attn_bwd_lse(P.lse[(b * Hq + hq) * Tq + t]);
      }
    }
  });
  // 2. Sink gradient, summed in a fixed order.
  if (P.sinks != nullptr) {
    at::parallel_for(0, Hq, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, B * Tq)), [&](int64_t h0, int64_t h1) {
      for (int64_t hq = h0; hq < h1; ++hq) {
        acc_t s = 0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t t = 0; t < Tq; ++t) {
            const int64_t row = ((b * Hkv + hq / G) * Tq + t) * G + hq % G;
            s += attn_sink_grad(P.sinks[hq], P.lse[(b * Hq + hq) * Tq + t], Drow[row]);
          }
        dsinks[hq] = s;
      }
    });
  }
  // 3. dK, dV per key tile; dQ partials per tile class c.
  const int64_t BQ = std::clamp<int64_t>(kRowsTarget / G, 1, std::max<int64_t>(Tq, 1)), R = BQ * G;
  const int64_t ntiles = (Tk + kBK - 1) / kBK;
  // bf16 with D % 32 == 0 on AMX: S = Q K^T and dP = dO V^T on tiles (exact bf16 products,
  // float sums, as the float GEMM computes them); dQ += dS K, dV += P^T dO and dK += dS^T Q on
  // tiles too, with P and dS each split into bf16 hi + lo parts (two products summed in float,
  // ~2^-17 relative: rounding them to bf16 alone, as a GPU's MMAs take them, doubled dQ's error
  // against the float64 oracle, past the bf16 tests' bound).
#if defined(CPU_CAPABILITY_AVX512)
  const bool use_amx = std::is_same_v<scalar_t, c10::BFloat16> && D % 32 == 0 && cpu_use_amx();
#else
  constexpr bool use_amx = false;
#endif
  const auto make_scratch = [&] { return BwdScratch<acc_t>(R, D, Dp, use_amx); };
  const int64_t work = 5 * B * Hq * Tq * (P.window > 0 ? std::min(P.window, Tk) : Tk) * D;
  parallel_units(B * Hkv * C, work, make_scratch, [&](int64_t u, BwdScratch<acc_t>& sc) {
    const int64_t c = u % C, bh = u / C, b = bh / Hkv, h = bh % Hkv;
#if defined(CPU_CAPABILITY_AVX512)
    if (use_amx) qk_amx_config();
#endif
    acc_t* dq = dq_part + (c * B * Hkv + bh) * Tq * G * Dp;
    std::fill(dq, dq + Tq * G * Dp, acc_t(0));
    const acc_t* Dr = Drow.data() + bh * Tq * G;
    const acc_t* Lr = Lrow.data() + bh * Tq * G;
    for (int64_t tile = c; tile < ntiles; tile += C) {
      const int64_t a = tile * kBK, e = std::min(Tk, a + kBK), n = e - a, np = round_up(n, VS);
      // Query positions that see a key in [a, e): pos >= a and pos - window + 1 <= e - 1.
      const int64_t t_lo = std::max<int64_t>(0, a - P.q_offset);
      const int64_t t_hi = P.window > 0 ? std::min(Tq, e + P.window - 1 - P.q_offset) : Tq;
      const int64_t kbase = ((b * Tk + a) * Hkv + h) * D;
      if (t_lo >= t_hi) {
        for (int64_t i = 0; i < n; ++i) {  // keys nobody sees
          std::fill(P.dk + kbase + i * Hkv * D, P.dk + kbase + i * Hkv * D + D, scalar_t(0));
          std::fill(P.dv + kbase + i * Hkv * D, P.dv + kbase + i * Hkv * D + D, scalar_t(0));
        }
        continue;
      }
      if (!use_amx) {
        for (int64_t i = 0; i < n; ++i) load_row(P.k + kbase + i * Hkv * D, sc.kn.data() + i * Dp, D);
        load_transposed(P.k + kbase, P.k + kbase, Hkv * D, n, n, D, sc.kt.data(), kBK);
        load_transposed(P.v + kbase, P.v + kbase, Hkv * D, n, n, D, sc.vt.data(), kBK);
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (use_amx) load_v_pairs(P.k + kbase, P.k + kbase, Hkv * D, n, n, D, sc.kvp.data());
      }
#endif
      std::fill(sc.dk.begin(), sc.dk.end(), acc_t(0));
      std::fill(sc.dv.begin(), sc.dv.end(), acc_t(0));
      for (int64_t t0 = t_lo; t0 < t_hi; t0 += BQ) {
        const int64_t t1 = std::min(t_hi, t0 + BQ), rows = (t1 - t0) * G;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t src = ((b * Tq + t) * Hq + h * G) * D, r0 = (t - t0) * G;
          if (use_amx) {  // the G rows of a position are contiguous
            std::memcpy(sc.qp.data() + r0 * D / 2, P.q + src, G * D * sizeof(scalar_t));
            std::memcpy(sc.dop.data() + r0 * D / 2, P.dout + src, G * D * sizeof(scalar_t));
            continue;
          }
          for (int64_t g = 0; g < G; ++g) {
            load_row(P.q + src + g * D, sc.qb.data() + (r0 + g) * Dp, D);
            load_row(P.dout + src + g * D, sc.dob.data() + (r0 + g) * Dp, D);
          }
        }
        acc_t* Pm = sc.p.data();
        acc_t* dS = sc.ds.data();
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (use_amx) {
            for (int64_t g = 0; g * 16 < rows; ++g) {
              const int64_t rg = std::min<int64_t>(16, rows - 16 * g);
              qk_amx_prepare(sc.qp.data() + 16 * g * D / 2, rg, D, sc.qt.data() + g * D / 2 * 16);
              qk_amx_prepare(sc.dop.data() + 16 * g * D / 2, rg, D, sc.dot.data() + g * D / 2 * 16);
              qk_amx(P.k + kbase, P.k + kbase, Hkv * D, n, n, D, sc.qt.data() + g * D / 2 * 16, rg, sc.st.data(),
                     sc.stage.data(), Pm + 16 * g * kBK);
              qk_amx(P.v + kbase, P.v + kbase, Hkv * D, n, n, D, sc.dot.data() + g * D / 2 * 16, rg, sc.st.data(),
                     sc.stage.data(), dS + 16 * g * kBK);
            }
          }
        }
#endif
        if (!use_amx) {
          gemm<acc_t, false, false>(rows, np, D, sc.qb.data(), Dp, sc.kt.data(), kBK, Pm, kBK);
          gemm<acc_t, false, false>(rows, np, D, sc.dob.data(), Dp, sc.vt.data(), kBK, dS, kBK);
        }
        const bool interior = a >= attn_first_visible(P.q_offset + t1 - 1, P.window) && e <= P.q_offset + t0 + 1;
        using V = AVec<acc_t>;
        const V vscale(P.scale);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = P.q_offset + t0 + r / G, row = t0 * G + r;
          acc_t* pr = Pm + r * kBK;
          acc_t* dr = dS + r * kBK;
          int64_t ra = 0, re = n;
          if (!interior) {
            ra = std::clamp<int64_t>(attn_first_visible(pos, P.window) - a, 0, n);
            re = std::clamp<int64_t>(pos + 1 - a, 0, n);
            re = std::max(re, ra);
          }
          // P = exp(s * scale - lse) on [ra, re), 0 elsewhere; dS = P * (dP - Di) * scale.
          const V vneg(-Lr[row]), vD(Dr[row]);
          for (int64_t j = 0; j < np; j += VS) {
            V pv = vexp<acc_t, FAST>(at::vec::fmadd(V::loadu(pr + j), vscale, vneg));
            if (j < ra || j + VS > re) {
              alignas(64) acc_t tmp[VS];
              pv.store(tmp);
              for (int64_t x = 0; x < VS; ++x)
                if (j + x < ra || j + x >= re) tmp[x] = acc_t(0);
              pv = V::loadu(tmp);
            }
            pv.store(pr + j);
            ((V::loadu(dr + j) - vD) * pv * vscale).store(dr + j);
          }
        }
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (use_amx) {  // the three products in pair order (load_v_pairs), hi and lo parts each
            const int64_t npairs = (rows + 1) / 2, npr = round_up(npairs, 16);
            const auto* dob16 = reinterpret_cast<const c10::BFloat16*>(sc.dop.data());
            const auto* qb16 = reinterpret_cast<const c10::BFloat16*>(sc.qp.data());
            load_v_pairs(dob16, dob16, D, rows, rows, D, sc.dopp.data());
            load_v_pairs(qb16, qb16, D, rows, rows, D, sc.qpp.data());
            split_rows_bf16(dS, kBK, rows, np, sc.dsh.data(), sc.dsl.data(), kBK / 2);
            split_cols_bf16(Pm, kBK, rows, np, npr, sc.pth.data(), sc.ptl.data(), npr);
            split_cols_bf16(dS, kBK, rows, np, npr, sc.dsth.data(), sc.dstl.data(), npr);
            for (int64_t g = 0; g * 16 < rows; ++g) {
              const int64_t off = 16 * g * (kBK / 2);
              pv_amx(sc.dsh.data() + off, sc.dsl.data() + off, std::min<int64_t>(16, rows - 16 * g), sc.kvp.data(),
                     (n + 1) / 2, D, sc.ot.data(), dq + (t0 * G + 16 * g) * Dp, Dp);
            }
            for (int64_t i0 = 0; i0 < n; i0 += 16) {
              const int64_t ri = std::min<int64_t>(16, n - i0);
              pv_amx(sc.pth.data() + i0 * npr, sc.ptl.data() + i0 * npr, ri, sc.dopp.data(), npairs, D, sc.ot.data(),
                     sc.dv.data() + i0 * Dp, Dp, npr);
              pv_amx(sc.dsth.data() + i0 * npr, sc.dstl.data() + i0 * npr, ri, sc.qpp.data(), npairs, D, sc.ot.data(),
                     sc.dk.data() + i0 * Dp, Dp, npr);
            }
            continue;
          }
        }
#endif
        gemm<acc_t, true, true>(n, Dp, rows, Pm, kBK, sc.dob.data(), Dp, sc.dv.data(), Dp);
        gemm<acc_t, true, true>(n, Dp, rows, dS, kBK, sc.qb.data(), Dp, sc.dk.data(), Dp);
        gemm<acc_t, false, true>(rows, Dp, n, dS, kBK, sc.kn.data(), Dp, dq + t0 * G * Dp, Dp);
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (use_amx)
          for (int64_t i = 0; i < n; ++i) {
            unpermute_pair_order(sc.dk.data() + i * Dp, D);
            unpermute_pair_order(sc.dv.data() + i * Dp, D);
          }
      }
#endif
      for (int64_t i = 0; i < n; ++i) {
        store_row(sc.dk.data() + i * Dp, acc_t(1), P.dk + kbase + i * Hkv * D, D);
        store_row(sc.dv.data() + i * Dp, acc_t(1), P.dv + kbase + i * Hkv * D, D);
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (use_amx) {  // the tile products left this unit's dQ partial in pair order
        for (int64_t r = 0; r < Tq * G; ++r) unpermute_pair_order(dq + r * Dp, D);
        qk_amx_release();
      }
    }
#endif
  });
}

// dq[b, t, h*G+g, :] = sum over c of dq_part[c][b][h][t*G+g][:], converted to scalar_t.
template <typename scalar_t, typename acc_t>
void reduce_dq(const acc_t* part, int64_t C, int64_t B, int64_t Tq, int64_t Hq, int64_t Hkv, int64_t D,
               scalar_t* dq) {
  constexpr int64_t VS = AVec<acc_t>::size();
  const int64_t G = Hq / Hkv, Dp = round_up(D, VS), per_c = B * Tq * Hq * Dp;
  at::parallel_for(0, B * Tq, std::max<int64_t>(1, (1 << 18) / (Hq * D)), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> sum(Dp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Tq, t = p % Tq;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const int64_t row = ((b * Hkv + hq / G) * Tq + t) * G + hq % G;
        std::copy(part + row * Dp, part + (row + 1) * Dp, sum.begin());
        for (int64_t c = 1; c < C; ++c)
          for (int64_t i = 0; i < Dp; ++i) sum[i] += part[c * per_c + row * Dp + i];
        store_row(sum.data(), acc_t(1), dq + (p * Hq + hq) * D, D);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& sinks, const at::Tensor& out_in, const at::Tensor& lse_in,
    double sm_scale, int64_t window, int64_t q_offset) {
  check_attention_backward(grad_out, q_in, k_in, v_in, sinks, out_in, lse_in, sm_scale, window, q_offset);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = grad_out.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3), Tk = k.size(1), Hkv = k.size(2);
  const auto acc = acc_dtype(q.scalar_type());
  const bool has_sinks = sinks.has_value() && sinks->defined();
  const at::Tensor s_acc = sinks_acc(sinks, acc);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor ds = at::zeros({has_sinks ? Hq : 0}, q.options().dtype(acc));
  const int64_t tasks = B * Hkv, ntiles = (Tk + kBK - 1) / kBK;
  // Key-tile classes per (b, kv head): enough tasks for the threads, at most 8 dQ partials.
  const int64_t C = std::clamp<int64_t>((2 * at::get_num_threads() + tasks - 1) / std::max<int64_t>(tasks, 1),
                                        1, std::clamp<int64_t>(ntiles, 1, 8));
  const int64_t Dp = round_up(D, acc == at::kDouble ? AVec<double>::size() : AVec<float>::size());
  at::Tensor dq_part = at::empty({C, B, Tq, Hq, Dp}, q.options().dtype(acc));  // zeroed by the tasks
  if (q.numel() > 0 || k.numel() > 0) {
    const auto fill = [&](auto& P) {
      P.B = B;
      P.Tq = Tq;
      P.Tk = Tk;
      P.Hq = Hq;
      P.Hkv = Hkv;
      P.D = D;
      P.window = window;
      P.q_offset = q_offset;
    };
    if (q.scalar_type() == at::kDouble) {
      BwdProblem<double, double> P;
      fill(P);
      P.q = q.const_data_ptr<double>();
      P.k = k.const_data_ptr<double>();
      P.v = v.const_data_ptr<double>();
      P.dout = dout.const_data_ptr<double>();
      P.out = out.const_data_ptr<double>();
      P.lse = lse.const_data_ptr<double>();
      P.sinks = sinks_ptr<double>(s_acc);
      P.scale = sm_scale;
      P.dk = dk.mutable_data_ptr<double>();
      P.dv = dv.mutable_data_ptr<double>();
      attention_bwd_impl<double, double, false>(P, dq_part.mutable_data_ptr<double>(), C,
                                                has_sinks ? ds.mutable_data_ptr<double>() : nullptr);
      reduce_dq(dq_part.const_data_ptr<double>(), C, B, Tq, Hq, Hkv, D, dq.mutable_data_ptr<double>());
    } else {
      GPTOSS_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "attention_backward", [&] {
        BwdProblem<scalar_t, float> P;
        fill(P);
        P.q = q.const_data_ptr<scalar_t>();
        P.k = k.const_data_ptr<scalar_t>();
        P.v = v.const_data_ptr<scalar_t>();
        P.dout = dout.const_data_ptr<scalar_t>();
        P.out = out.const_data_ptr<scalar_t>();
        P.lse = lse.const_data_ptr<float>();
        P.sinks = sinks_ptr<float>(s_acc);
        P.scale = static_cast<float>(sm_scale);
        P.dk = dk.mutable_data_ptr<scalar_t>();
        P.dv = dv.mutable_data_ptr<scalar_t>();
        constexpr bool fast = !std::is_same_v<scalar_t, float>;
        attention_bwd_impl<scalar_t, float, fast>(P, dq_part.mutable_data_ptr<float>(), C,
                                                  has_sinks ? ds.mutable_data_ptr<float>() : nullptr);
        reduce_dq(dq_part.const_data_ptr<float>(), C, B, Tq, Hq, Hkv, D, dq.mutable_data_ptr<scalar_t>());
      });
    }
  }
  at::Tensor grad_sinks = has_sinks ? ds.to(sinks->scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dv, grad_sinks};
}

// ---------------------------------------------------------------------------- KV cache

// lengths as host int64 values, each checked >= 0.
std::vector<int64_t> host_lengths(const at::Tensor& lengths, const char* op) {
  const at::Tensor l = lengths.cpu().contiguous();
  const int32_t* p = l.const_data_ptr<int32_t>();
  std::vector<int64_t> out(l.numel());
  for (int64_t b = 0; b < l.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0, op, ": lengths must be >= 0, got lengths[", b, "] = ", p[b]);
    out[b] = p[b];
  }
  return out;
}

void kv_cache_append(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_in, const at::Tensor& v_in,
                     const at::Tensor& lengths, bool ring) {
  check_kv_cache_append(k_cache, v_cache, k_in, v_in, lengths, ring);
  const char* op = "kv_cache_append";
  const int64_t B = k_cache.size(0), S = k_cache.size(1), Tn = k_in.size(1);
  const int64_t row = k_cache.size(2) * k_cache.size(3);  // Hkv * D elements per token
  const std::vector<int64_t> len = host_lengths(lengths, op);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ring || len[b] + Tn <= S, op, ": cache overflow: lengths[", b, "] = ", len[b], " + ", Tn,
                " new tokens exceeds the cache size S = ", S, " (ring = false)");
  if (Tn == 0 || row == 0) return;
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t esz = k.element_size();
  const char* ks = static_cast<const char*>(k.const_data_ptr());
  const char* vs = static_cast<const char*>(v.const_data_ptr());
  char* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  char* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 16384 / row), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Tn, i = p % Tn, slot = (len[b] + i) % S;
      std::memcpy(kc + (b * S + slot) * row * esz, ks + p * row * esz, row * esz);
      std::memcpy(vc + (b * S + slot) * row * esz, vs + p * row * esz, row * esz);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_decode(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& lengths,
                                                    const c10::optional<at::Tensor>& sinks, double sm_scale,
                                                    int64_t window, bool ring) {
  check_attention_decode(q_in, k_cache, v_cache, lengths, sinks, sm_scale, window, ring);
  const char* op = "attention_decode";
  const at::Tensor q = q_in.contiguous(), k = rows_view(k_cache), v = rows_view(v_cache);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), S = k.size(1);
  const auto acc = acc_dtype(q.scalar_type());
  const std::vector<int64_t> len = host_lengths(lengths, op);
  std::vector<int64_t> kv_begin(B), kv_end(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ring || len[b] + Tq <= S, op, ": cache overflow: lengths[", b, "] = ", len[b], " + Tq = ", Tq,
                " exceeds the cache size S = ", S, " (ring = false)");
    kv_end[b] = len[b] + Tq;
    kv_begin[b] = ring ? std::max<int64_t>(0, kv_end[b] - S) : 0;
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(acc));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  attention_forward_common(q, k, v, sinks_acc(sinks, acc), sm_scale, window, len, kv_begin, kv_end, ring,
                           out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
  m.impl("kv_cache_append", &kv_cache_append);
  m.impl("attention_decode", &attention_decode);
}

}  // namespace gptoss::cpu
