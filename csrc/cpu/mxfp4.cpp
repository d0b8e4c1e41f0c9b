// MXFP4 on the CPU (spec §3.2): dequantize, quantize, and the grouped expert GEMM with MXFP4
// weights decoded inside the kernel (W4A16). Element decoding is moe_math.h's: value =
// e2m1_twice(nibble) * e8m0_half_scale(scale), exact; the AVX-512 paths look the 16 doubled E2M1
// values up with one permute and multiply by the same half scale. Contracts: registration.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/dispatch.h"
#include "common/moe_math.h"
#include "common/vec.h"
#include "cpu/moe_cpu.h"
#include "ops.h"

namespace gptoss::cpu {
namespace {

// e8m0_half_scale for every scale byte, the 16 doubled E2M1 values (as floats, and as bf16 bits
// twice over: a 32-word vpermw table), and per scale byte s the 16 MXFP4 values at that scale as
// bf16 bits (twice over), exact for s in 2..252 (their products stay normal bf16): one load gives
// decode_rows_bf16 the vpermw table of a block.
struct Tables {
  alignas(64) float half_scale[256];
  alignas(64) float twice[16];
  alignas(64) uint16_t twice_bf16[32];
  alignas(64) uint16_t value_bf16[256][32];
  Tables() {
    for (uint32_t s = 0; s < 256; ++s) half_scale[s] = e8m0_half_scale(s);
    for (uint32_t n = 0; n < 16; ++n) twice[n] = e2m1_twice(n);
    for (int i = 0; i < 32; ++i) twice_bf16[i] = c10::BFloat16(twice[i & 15]).x;
    for (uint32_t s = 0; s < 256; ++s)
      for (int i = 0; i < 32; ++i) value_bf16[s][i] = c10::BFloat16(twice[i & 15] * half_scale[s]).x;
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// Decode one 32-element block to floats in natural element order.
inline void decode_block(const uint8_t* b, uint8_t s, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const Tables& tb = tables();
  const __m512 lut = _mm512_load_ps(tb.twice);
  const __m512 sc = _mm512_set1_ps(tb.half_scale[s]);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut), sc);
  const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), sc);
  // interleave: element 2j = lo[j], 2j+1 = hi[j]
  const __m512i idx0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i idx1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, idx0, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, idx1, hi));
#else
  const float hs = e8m0_half_scale(s);
  for (int j = 0; j < 16; ++j) {
    out[2 * j] = e2m1_twice(b[j] & 15u) * hs;
    out[2 * j + 1] = e2m1_twice(b[j] >> 4) * hs;
  }
#endif
}

// ----------------------------------------------------------------------------- Dequantize

at::Tensor mxfp4_dequantize(const at::Tensor& blocks_in, const at::Tensor& scales_in, at::ScalarType dtype) {
  check_mxfp4_dequantize(blocks_in, scales_in, dtype);
  const at::Tensor blocks = blocks_in.contiguous(), scales = scales_in.contiguous();
  auto shape = scales.sizes().vec();
  const int64_t nblk = scales.numel();
  shape.back() *= 32;
  at::Tensor out = at::empty(shape, blocks.options().dtype(dtype));
  if (nblk == 0) return out;
  const uint8_t* pb = blocks.const_data_ptr<uint8_t>();
  const uint8_t* ps = scales.const_data_ptr<uint8_t>();
  if (dtype == at::kDouble) {
    double* po = out.mutable_data_ptr<double>();
    at::parallel_for(0, nblk, 2048, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const double hs = e8m0_half_scale(ps[i]);  // exact in double: no overflow at scale 255
        for (int j = 0; j < 16; ++j) {
          po[i * 32 + 2 * j] = static_cast<double>(e2m1_twice(pb[i * 16 + j] & 15u)) * hs;
          po[i * 32 + 2 * j + 1] = static_cast<double>(e2m1_twice(pb[i * 16 + j] >> 4)) * hs;
        }
      }
    });
    return out;
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(dtype, "mxfp4_dequantize", [&] {
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblk, 2048, [&](int64_t b0, int64_t b1) {
      alignas(64) float buf[32];
      for (int64_t i = b0; i < b1; ++i) {
        decode_block(pb + i * 16, ps[i], buf);
        for (int64_t c = 0; c < 32; c += kVecSize) store_f(po + i * 32 + c, fVec::loadu(buf + c));
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------- Quantize

template <typename TIn, typename TC>
bool quantize_block(const TIn* w, uint8_t* blk, uint8_t* sc) {
  TC v[32];
  TC amax = 0;
  for (int i = 0; i < 32; ++i) {
    v[i] = static_cast<TC>(w[i]);
    if (!std::isfinite(v[i])) return false;
    amax = std::max(amax, std::abs(v[i]));
  }
  int ex = 0;
  const TC mant = std::frexp(amax, &ex);  // amax = mant * 2^ex, mant in [0.5, 1)
  int e = amax == 0 ? 0 : (mant <= TC(0.75) ? ex - 3 : ex - 2);  // smallest e with amax <= 6 * 2^e
  e = std::min(127, std::max(-127, e));
  *sc = static_cast<uint8_t>(e + 127);
  const TC inv = std::ldexp(TC(1), -e);  // exact; w * 2^-e rounds exactly as w / 2^e
  uint8_t nib[32];
  for (int i = 0; i < 32; ++i) {
    const TC y = v[i] * inv, m = std::abs(y);
    // nearest E2M1 magnitude index, ties to the even index (mantissa bit 0)
    const int idx = (m > TC(0.25)) + (m >= TC(0.75)) + (m > TC(1.25)) + (m >= TC(1.75)) + (m > TC(2.5)) +
                    (m >= TC(3.5)) + (m > TC(5.0));
    nib[i] = static_cast<uint8_t>(idx + ((y < 0 && idx > 0) ? 8 : 0));
  }
  for (int j = 0; j < 16; ++j) blk[j] = static_cast<uint8_t>(nib[2 * j] | (nib[2 * j + 1] << 4));
  return true;
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize(const at::Tensor& w_in) {
  check_mxfp4_quantize(w_in);
  const at::Tensor w = w_in.contiguous();
  auto sshape = w.sizes().vec();
  sshape.back() /= 32;
  auto bshape = sshape;
  bshape.push_back(16);
  at::Tensor blocks = at::empty(bshape, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty(sshape, w.options().dtype(at::kByte));
  const int64_t nblk = scales.numel();
  if (nblk == 0) return {blocks, scales};
  uint8_t* pb = blocks.mutable_data_ptr<uint8_t>();
  uint8_t* ps = scales.mutable_data_ptr<uint8_t>();
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "mxfp4_quantize", [&] {
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, nblk, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const bool ok = std::is_same_v<scalar_t, double>
                            ? quantize_block<scalar_t, double>(pw + i * 32, pb + i * 16, ps + i)
                            : quantize_block<scalar_t, float>(pw + i * 32, pb + i * 16, ps + i);
        if (!ok) finite.store(false, std::memory_order_relaxed);
      }
    });
  });
  TORCH_CHECK(finite.load(), "mxfp4_quantize: w must be finite (found inf or NaN)");
  return {blocks, scales};
}

// ------------------------------------------------------------------- Grouped GEMM (W4A16)

// Grouped rows at most this many per expert take the direct kernel (decode each weight row once
// and dot it with every row); more rows dequantize a tile of weight rows and run a GEMM on it.
constexpr int64_t kDirectMaxRows = 16;
// Software prefetch distance of the direct kernels, in weight rows.
constexpr int64_t kPrefetchRows = 8;

// Row layout of the direct kernel's float input: per 32-block, the 16 even elements then the 16
// odd ones, so that the low / high nibbles of the 16 bytes meet their inputs without a shuffle.
template <typename T>
void split_row(const T* src, float* dst, int64_t k) {
  for (int64_t b = 0; b < k; b += 32)
    for (int j = 0; j < 16; ++j) {
      dst[b + j] = static_cast<float>(src[b + 2 * j]);
      dst[b + 16 + j] = static_cast<float>(src[b + 2 * j + 1]);
    }
}

// Row layout of the bf16 direct kernel's input: per 64 elements (two blocks), the 32 even elements
// then the 32 odd ones; k (a multiple of 32) padded with zeros to pair_len(k).
inline int64_t pair_len(int64_t k) { return (k + 63) / 64 * 64; }

inline void split_pairs_bf16(const at::BFloat16* src, at::BFloat16* dst, int64_t k) {
  for (int64_t p = 0; p < k; p += 64)
    for (int j = 0; j < 32; ++j) {
      const bool in = p + 2 * j < k;  // (k % 64 == 32: the last pair's second block is padding)
      dst[p + j] = in ? src[p + 2 * j] : at::BFloat16(0.f);
      dst[p + 32 + j] = in ? src[p + 2 * j + 1] : at::BFloat16(0.f);
    }
}

// h[r * ldh + (o - o0)] = sum_c W[o, c] * x_r[c] for weight rows o in [o0, o1) and NR input rows.
template <int NR>
void direct_rows(const uint8_t* blocks, const uint8_t* scales, int64_t g, int64_t o0, int64_t o1, const float* xs,
                 int64_t ldx, float* h, int64_t ldh) {
#if defined(CPU_CAPABILITY_AVX512)
  const Tables& tb = tables();
  const __m512 lut = _mm512_load_ps(tb.twice);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* bo = blocks + o * g * 16;
    const uint8_t* so = scales + o * g;
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    const bool prefetch = o + kPrefetchRows < o1;  // (rows past the tile are another task's)
    for (int64_t b = 0; b < g; ++b) {
      if (prefetch && (b & 3) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(bo + (kPrefetchRows * g + b) * 16), _MM_HINT_T0);
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bo + b * 16)));
      const __m512 sc = _mm512_set1_ps(tb.half_scale[so[b]]);
      const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut), sc);
      const __m512 wh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), sc);
      for (int r = 0; r < NR; ++r) {
        const float* xr = xs + r * ldx + b * 32;
        acc[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), acc[r]);
        acc[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr + 16), acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) h[r * ldh + (o - o0)] = _mm512_reduce_add_ps(acc[r]);
  }
#else
  for (int64_t o = o0; o < o1; ++o) {
    float acc[NR] = {};
    for (int64_t b = 0; b < g; ++b) {
      const float hs = e8m0_half_scale(scales[o * g + b]);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = blocks[(o * g + b) * 16 + j];
        const float wl = e2m1_twice(byte & 15u) * hs, wh = e2m1_twice(byte >> 4) * hs;
        for (int r = 0; r < NR; ++r) acc[r] += wl * xs[r * ldx + b * 32 + j] + wh * xs[r * ldx + b * 32 + 16 + j];
      }
    }
    for (int r = 0; r < NR; ++r) h[r * ldh + (o - o0)] = acc[r];
  }
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// The same dot products for bfloat16 inputs on AVX512-BF16, two 32-element blocks per step. The
// 32 bytes widen to 32 words (one vpmovzxbw); vpermw over the 16 doubled E2M1 values (a 32-word
// table, twice over) looks up the low nibbles as they are and the high nibbles after a 4-bit shift,
// giving the step's even elements and its odd ones; vdpbf16ps multiplies them with the input's even
// and odd elements (exact products, float sums: lanes 0-7 hold the first block's, 8-15 the second's)
// and one fma applies the two blocks' half scales. xp: [NR, ldx] bf16 rows in the pair-split
// layout of split_pairs_bf16. Two weight rows at a time (two memory streams).
#define GPTOSS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

GPTOSS_BF16_TARGET inline __m512i load_pair_words(const uint8_t* b, bool two) {
  return _mm512_cvtepu8_epi16(two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))
                                  : _mm256_inserti128_si256(_mm256_setzero_si256(),
                                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 0));
}

// Half scales of blocks b (lanes 0-7) and b + 1 (lanes 8-15; the same when there is no b + 1).
GPTOSS_BF16_TARGET inline __m512 pair_scales(const float* hs, const uint8_t* s, int64_t b, bool two) {
  return _mm512_mask_broadcastss_ps(_mm512_set1_ps(hs[s[b]]), 0xFF00, _mm_set_ss(hs[s[two ? b + 1 : b]]));
}

// One step of direct_rows_bf16: blocks b and b + 1 (two) of a weight row into acc[NR].
template <int NR>
GPTOSS_BF16_TARGET inline void pair_step(const __m512i lut, const float* hs, const uint8_t* bo, const uint8_t* so,
                                         int64_t b, bool two, const at::BFloat16* xp, int64_t ldx, __m512 (&acc)[NR]) {
  const __m512i raw = load_pair_words(bo + b * 16, two);
  const __m512i lo = _mm512_permutexvar_epi16(raw, lut);
  const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4), lut);
  const __m512 sc = pair_scales(hs, so, b, two);
  for (int r = 0; r < NR; ++r) {
    const at::BFloat16* xr = xp + r * ldx + b * 32;
    const __m512bh xe = (__m512bh)_mm512_loadu_si512(xr), xo = (__m512bh)_mm512_loadu_si512(xr + 32);
    const __m512 d = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, xe), (__m512bh)hi, xo);
    acc[r] = _mm512_fmadd_ps(d, sc, acc[r]);
  }
}

template <int NR>
GPTOSS_BF16_TARGET void direct_rows_bf16(const uint8_t* blocks, const uint8_t* scales, int64_t g, int64_t o0,
                                         int64_t o1, const at::BFloat16* xp, int64_t ldx, float* h, int64_t ldh) {
  const Tables& tb = tables();
  const __m512i lut = _mm512_load_si512(tb.twice_bf16);
  const __m512 zero = _mm512_setzero_ps();
  // Prefetches: the loop asks for the rows kPrefetchRows ahead into L2 (past the tile too: a
  // prefetch never faults) and 2 rows ahead into L1; the tile's first kPrefetchRows rows here.
  // Without them the kernel runs at half the speed (the hardware prefetcher does not keep up with
  // the two row streams); into L2 leaves more misses in flight than L1's fill buffers allow.
  for (int64_t i = o0 * g * 16; i < std::min(o1, o0 + kPrefetchRows) * g * 16; i += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blocks + i), _MM_HINT_T1);
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) {
    const uint8_t* b0 = blocks + o * g * 16;
    const uint8_t* b1 = b0 + g * 16;
    const uint8_t* s0 = scales + o * g;
    const uint8_t* s1 = s0 + g;
    __m512 acc0[NR], acc1[NR];
    for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = zero;
    for (int64_t b = 0; b < g; b += 2) {
      if ((b & 3) == 0) {  // one cache line per 4 blocks
        _mm_prefetch(reinterpret_cast<const char*>(b0 + (kPrefetchRows * g + b) * 16), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(b1 + (kPrefetchRows * g + b) * 16), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(b0 + (2 * g + b) * 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b1 + (2 * g + b) * 16), _MM_HINT_T0);
      }
      const bool two = b + 1 < g;
      pair_step<NR>(lut, tb.half_scale, b0, s0, b, two, xp, ldx, acc0);
      pair_step<NR>(lut, tb.half_scale, b1, s1, b, two, xp, ldx, acc1);
    }
    for (int r = 0; r < NR; ++r) {
      h[r * ldh + (o - o0)] = _mm512_reduce_add_ps(acc0[r]);
      h[r * ldh + (o + 1 - o0)] = _mm512_reduce_add_ps(acc1[r]);
    }
  }
  for (; o < o1; ++o) {
    __m512 acc0[NR];
    for (int r = 0; r < NR; ++r) acc0[r] = zero;
    for (int64_t b = 0; b < g; b += 2)
      pair_step<NR>(lut, tb.half_scale, blocks + o * g * 16, scales + o * g, b, b + 1 < g, xp, ldx, acc0);
    for (int r = 0; r < NR; ++r) h[r * ldh + (o - o0)] = _mm512_reduce_add_ps(acc0[r]);
  }
}

GPTOSS_BF16_TARGET void direct_rows_bf16_any(int nr, const uint8_t* blocks, const uint8_t* scales, int64_t g,
                                             int64_t o0, int64_t o1, const at::BFloat16* xb, int64_t ldx, float* h,
                                             int64_t ldh) {
  switch (nr) {
    case 1: return direct_rows_bf16<1>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 2: return direct_rows_bf16<2>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 3: return direct_rows_bf16<3>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 4: return direct_rows_bf16<4>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 5: return direct_rows_bf16<5>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 6: return direct_rows_bf16<6>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    case 7: return direct_rows_bf16<7>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
    default: return direct_rows_bf16<8>(blocks, scales, g, o0, o1, xb, ldx, h, ldh);
  }
}

#else
void direct_rows_bf16_any(int, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, const at::BFloat16*,
                          int64_t, float*, int64_t) {}
#endif

void direct_rows_any(int nr, const uint8_t* blocks, const uint8_t* scales, int64_t g, int64_t o0, int64_t o1,
                     const float* xs, int64_t ldx, float* h, int64_t ldh) {
  switch (nr) {
    case 1: return direct_rows<1>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 2: return direct_rows<2>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 3: return direct_rows<3>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 4: return direct_rows<4>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 5: return direct_rows<5>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 6: return direct_rows<6>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    case 7: return direct_rows<7>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
    default: return direct_rows<8>(blocks, scales, g, o0, o1, xs, ldx, h, ldh);
  }
}

// MXFP4 weight rows [o0, o0 + nt) -> bf16 rows [nt][32 g] (row-major; the tiled path's brgemm A
// operand). Decoded values are exact in bf16 (at most 2 significant bits, float's exponent range),
// so the bf16 bits are the float's upper 16 bits. Scale bytes 2..252 (all of gpt-oss): one vpermw
// over the block's scale's table of values (Tables::value_bf16); other scale bytes (subnormal or
// overflowing products) go through floats.
void decode_rows_bf16(const uint8_t* blocks, const uint8_t* scales, int64_t g, int64_t o0, int64_t nt,
                      at::BFloat16* dst) {
  const int64_t kdim = g * 32;
#if defined(CPU_CAPABILITY_AVX512)
  const Tables& tb = tables();
  const __m512 lut = _mm512_load_ps(tb.twice);
  const __m512i low4 = _mm512_set1_epi32(15), high16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  for (int64_t o = 0; o < nt; ++o) {
    const uint8_t* brow = blocks + (o0 + o) * g * 16;
    const uint8_t* srow = scales + (o0 + o) * g;
    at::BFloat16* drow = dst + o * kdim;
    for (int64_t b = 0; b < g; ++b) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(brow + b * 16)));
      const uint32_t s = srow[b];
      __m512i r;
      if (s >= 2u && s <= 252u) {
        // dword i = (byte i & 15) | (byte i >> 4) << 16: word 2i indexes element 2i, 2i+1 the next
        r = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), nib, 0xA8),
                                     _mm512_load_si512(tb.value_bf16[s]));
      } else {
        const __m512 sc = _mm512_set1_ps(tb.half_scale[s]);
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut), sc);
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), sc);
        r = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16),
                            _mm512_and_si512(_mm512_castps_si512(hi), high16));
      }
      _mm512_storeu_si512(drow + b * 32, r);
    }
  }
#else
  for (int64_t o = 0; o < nt; ++o)
    for (int64_t b = 0; b < g; ++b) {
      const float hs = e8m0_half_scale(scales[(o0 + o) * g + b]);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = blocks[((o0 + o) * g + b) * 16 + j];
        dst[o * kdim + b * 32 + 2 * j] = c10::BFloat16(e2m1_twice(byte & 15u) * hs);
        dst[o * kdim + b * 32 + 2 * j + 1] = c10::BFloat16(e2m1_twice(byte >> 4) * hs);
      }
    }
#endif
}

// Weight rows per task of the ATen-GEMM fallback of the tiled path.
constexpr int64_t kMmTile = 128;

at::Tensor moe_grouped_gemm_mxfp4(const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index,
                                  const at::Tensor& offsets, const at::Tensor& blocks_in, const at::Tensor& scales_in,
                                  const c10::optional<at::Tensor>& bias_in, bool fused_swiglu, double alpha,
                                  double limit) {
  const int64_t n = check_moe_grouped_gemm_mxfp4(x_in, row_index, offsets, blocks_in, scales_in, bias_in,
                                                 fused_swiglu, alpha, limit);
  const at::Tensor x = x_in.contiguous(), blocks = blocks_in.contiguous(), scales = scales_in.contiguous();
  const Grouping grp = make_grouping(offsets, row_index, n, x.size(0), "moe_grouped_gemm_mxfp4");
  const int64_t e_count = blocks.size(0), m = blocks.size(1), g = blocks.size(2), kdim = g * 32;
  const int64_t mo = fused_swiglu ? m / 2 : m;
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({n, mo}, x.options());
  if (n == 0 || mo == 0) return out;
  const float a = static_cast<float>(alpha), l = clamp_limit(limit);
  const uint8_t* pb = blocks.const_data_ptr<uint8_t>();
  const uint8_t* ps = scales.const_data_ptr<uint8_t>();
  const float* pbias = has_bias ? bias.const_data_ptr<float>() : nullptr;
  const int64_t wrow = g * 16;  // bytes per weight row

  // Direct kernel for experts with few rows: weight-row tiles sized so that every thread gets
  // several tasks even for one expert (decode: T = 1 touches k experts).
  const int64_t direct_tile =
      std::max<int64_t>(16, (m / (4 * std::max<int64_t>(1, at::get_num_threads()))) & ~int64_t{15});
  const std::vector<TileTask> direct = make_tile_tasks(grp.offsets, m, direct_tile, 1, kDirectMaxRows);
  const bool vnni = x.scalar_type() == at::kBFloat16 && vnni_gemm_available();
  // bf16 inputs on AVX512-BF16: the direct kernel reads the gathered bf16 rows as they are.
  const bool direct_bf16 = x.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16();
  const std::vector<TileTask> tiled =
      make_tile_tasks(grp.offsets, m, vnni ? kVnniTile : kMmTile, kDirectMaxRows + 1);

  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "moe_grouped_gemm_mxfp4", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    // Grouped inputs: for the direct kernel split float rows (or pair-split bf16 rows), rows in x's
    // dtype for the tiled one.
    const int64_t kp = pair_len(kdim);
    at::Tensor xs = at::empty({direct.empty() || direct_bf16 ? 0 : n, kdim}, x.options().dtype(at::kFloat));
    at::Tensor xp = at::empty({direct.empty() || !direct_bf16 ? 0 : n, kp}, x.options());
    at::Tensor xg = at::empty({tiled.empty() ? 0 : n, kdim}, x.options());
    float* pxs = xs.mutable_data_ptr<float>();
    scalar_t* pxp = xp.mutable_data_ptr<scalar_t>();
    scalar_t* pxg = xg.mutable_data_ptr<scalar_t>();
    // (a parallel region only when the copy is big enough to pay for waking the threads)
    at::parallel_for(0, e_count, std::max<int64_t>(1, e_count * (1 << 20) / std::max<int64_t>(1, n * kdim)),
                     [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t ne = grp.offsets[e + 1] - grp.offsets[e];
        for (int64_t r = grp.offsets[e]; r < grp.offsets[e + 1]; ++r) {
          const scalar_t* src = px + grp.src_row(r) * kdim;
          if (ne > kDirectMaxRows) {
            std::copy(src, src + kdim, pxg + r * kdim);
          } else if (direct_bf16) {  // (x is bfloat16)
            split_pairs_bf16(reinterpret_cast<const at::BFloat16*>(src), reinterpret_cast<at::BFloat16*>(pxp) + r * kp,
                             kdim);
          } else {
            split_row(src, pxs + r * kdim, kdim);
          }
        }
      }
    });

    auto epilogue = [&](const float* h, int64_t ldh, int64_t e, int64_t r0, int64_t rows, int64_t o0, int64_t nt) {
      const float* b = pbias ? pbias + e * m + o0 : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        if (fused_swiglu)
          swiglu_row(h + r * ldh, po + (r0 + r) * mo + o0 / 2, nt / 2, a, l, b);
        else
          bias_row(h + r * ldh, po + (r0 + r) * mo + o0, nt, b);
      }
    };

    run_tasks(
        static_cast<int64_t>(direct.size()), n * m * kdim, [] { return std::vector<float>(); },
        [&](int64_t ti, std::vector<float>& h) {
          const TileTask& t = direct[ti];
          const int64_t r0 = grp.offsets[t.e], ne = grp.offsets[t.e + 1] - r0;
          h.resize(ne * t.nt);
          for (int64_t rr = 0; rr < ne; rr += 8) {
            const int nr = static_cast<int>(std::min<int64_t>(8, ne - rr));
            if (direct_bf16)
              direct_rows_bf16_any(nr, pb + t.e * m * wrow, ps + t.e * m * g, g, t.o0, t.o0 + t.nt,
                                   reinterpret_cast<const at::BFloat16*>(pxp) + (r0 + rr) * kp, kp,
                                   h.data() + rr * t.nt, t.nt);
            else
              direct_rows_any(nr, pb + t.e * m * wrow, ps + t.e * m * g, g, t.o0, t.o0 + t.nt,
                              pxs + (r0 + rr) * kdim, kdim, h.data() + rr * t.nt, t.nt);
          }
          epilogue(h.data(), t.nt, t.e, r0, ne, t.o0, t.nt);
        });

    if (tiled.empty()) return;
    if (vnni) {  // x is bfloat16 here
      grouped_gemm_vnni(
          reinterpret_cast<const at::BFloat16*>(pxg), kdim, grp.offsets, m, tiled,
          [&](int64_t e, int64_t o0, int64_t nt, at::BFloat16* buf) {
            decode_rows_bf16(pb + e * m * wrow, ps + e * m * g, g, o0, nt, buf);
            return buf;
          },
          pbias, fused_swiglu, a, l, reinterpret_cast<at::BFloat16*>(po));
      return;
    }
    // Fallback: decode the tile to float32, float32 ATen GEMM (single-threaded in the region).
    const at::Tensor xf = xg.to(at::kFloat);
    run_tasks(
        static_cast<int64_t>(tiled.size()), n * m * kdim,
        [&] { return at::empty({kMmTile, kdim}, x.options().dtype(at::kFloat)); },
        [&](int64_t ti, at::Tensor& tile) {
          const TileTask& t = tiled[ti];
          const int64_t r0 = grp.offsets[t.e], ne = grp.offsets[t.e + 1] - r0;
          const uint8_t* be = pb + t.e * m * wrow;
          const uint8_t* se = ps + t.e * m * g;
          float* pt = tile.mutable_data_ptr<float>();
          for (int64_t o = t.o0; o < t.o0 + t.nt; ++o)
            for (int64_t b = 0; b < g; ++b) decode_block(be + o * wrow + b * 16, se[o * g + b], pt + (o - t.o0) * kdim + b * 32);
          const at::Tensor h = at::mm(xf.narrow(0, r0, ne), tile.narrow(0, 0, t.nt).t()).contiguous();
          epilogue(h.const_data_ptr<float>(), t.nt, t.e, r0, ne, t.o0, t.nt);
        });
  });
  return out;
}

// ------------------------------------------------- Whole expert half, few tokens (decode)

// Scratch reused across calls (per thread: the caller's and each helper's).
template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// out [T, d] for T <= kDirectMaxRows (every expert then has at most kDirectMaxRows grouped rows,
// the direct kernels' range), as one run_phased call: (1) W1 tiles of every selected expert with
// the bias and SwiGLU epilogue -> a [N, I]; (1b) a -> the direct kernel's layout; (2)
// column tiles of d, each running W2 for every selected expert, adding the bias, rounding y to
// x's dtype and combining its tokens in slot order. Every step computes and rounds as the op
// sequence does (the same direct kernels, epilogues and combine order).
template <typename scalar_t>
void experts_decode(const at::Tensor& x, const at::Tensor& logits, int64_t k, const uint8_t* pb1, const uint8_t* ps1,
                    const scalar_t* pbias1, const uint8_t* pb2, const uint8_t* ps2, const scalar_t* pbias2,
                    int64_t two_i, float alpha, float limit, at::Tensor& out) {
  const int64_t t = x.size(0), d = x.size(1), e_count = logits.size(1), inter = two_i / 2, n = t * k;
  const int64_t g1 = d / 32, g2 = inter / 32;
  // bf16 inputs on AVX512-BF16 feed the bf16 direct kernel as they are; the rest use split floats.
  const bool bf16 = std::is_same_v<scalar_t, at::BFloat16> && cpu_has_avx512_bf16();

  // routing and dispatch on the calling thread (moe_route, moe_dispatch)
  thread_local std::vector<float> wbuf;
  thread_local std::vector<int32_t> ibuf;
  float* weights = scratch(wbuf, n);
  int32_t* idx = scratch(ibuf, 3 * n + e_count + 1);
  int32_t *experts = idx, *row_token = idx + n, *row_of = idx + 2 * n, *offsets = idx + 3 * n;
  route_rows<scalar_t, float>(logits.const_data_ptr<scalar_t>(), weights, experts, t, e_count, k);
  std::fill(offsets, offsets + e_count + 1, 0);
  for (int64_t s = 0; s < n; ++s) ++offsets[experts[s] + 1];
  for (int64_t e = 0; e < e_count; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> active;  // selected experts, most rows first
  for (int64_t e = 0; e < e_count; ++e)
    if (offsets[e + 1] > offsets[e]) active.push_back(e);
  std::stable_sort(active.begin(), active.end(), [&](int64_t a, int64_t b) {
    return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
  });
  {
    std::vector<int32_t> fill(offsets, offsets + e_count);
    for (int64_t s = 0; s < n; ++s) {  // stable: slots in ascending order within an expert
      const int32_t r = fill[experts[s]]++;
      row_of[s] = r;
      row_token[r] = static_cast<int32_t>(s / k);
    }
  }

  // grouped inputs: pair-split bf16 rows (xg, row stride kp1), or split float rows (xs); a [N, I]
  // in x's dtype, then its rows split the same way for W2 (ap, stride kp2; or as)
  thread_local std::vector<float> fbuf;
  thread_local std::vector<scalar_t> sbuf;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const int64_t kp1 = pair_len(d), kp2 = pair_len(inter);
  scalar_t* xg = scratch(sbuf, n * (bf16 ? kp1 + kp2 : 0) + n * inter);
  scalar_t* ap = xg + n * (bf16 ? kp1 : 0);
  scalar_t* a = ap + n * (bf16 ? kp2 : 0);
  float* xs = scratch(fbuf, bf16 ? 0 : n * (d + inter));
  float* as = xs + n * d;
  // split a grouped row of length len (d or inter) into the direct kernels' layout
  auto split = [&](const scalar_t* src, int64_t r, int64_t len, scalar_t* pairs, int64_t kp, float* floats) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (bf16) return split_pairs_bf16(src, pairs + r * kp, len);
    }
    split_row(src, floats + r * len, len);
  };
  for (int64_t r = 0; r < n; ++r) split(px + static_cast<int64_t>(row_token[r]) * d, r, d, xg, kp1, xs);

  // task lists: tile sizes give every thread several tasks per phase
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_active = static_cast<int64_t>(active.size());
  const int64_t tile1 = std::clamp<int64_t>((n_active * two_i / (8 * nthr)) & ~int64_t{63}, 64, 512);
  const int64_t tile2 = std::clamp<int64_t>((d / (16 * nthr)) & ~int64_t{15}, 16, 256);
  const int64_t per_expert1 = (two_i + tile1 - 1) / tile1;
  const int64_t n1 = n_active * per_expert1, n1b = n, n2 = (d + tile2 - 1) / tile2;
  const float* w = weights;
  scalar_t* po = out.mutable_data_ptr<scalar_t>();

  // h [rows, nt] = W[o0, o0 + nt) . in rows [r0, r0 + ne) (bf16 rows or split floats, ldx)
  auto gemv = [&](const uint8_t* blocks, const uint8_t* scales, int64_t g, int64_t o0, int64_t nt, const void* in,
                  int64_t ldx, int64_t ne, float* h) {
    for (int64_t rr = 0; rr < ne; rr += 8) {
      const int nr = static_cast<int>(std::min<int64_t>(8, ne - rr));
      if (bf16)
        direct_rows_bf16_any(nr, blocks, scales, g, o0, o0 + nt, static_cast<const at::BFloat16*>(in) + rr * ldx, ldx,
                             h + rr * nt, nt);
      else
        direct_rows_any(nr, blocks, scales, g, o0, o0 + nt, static_cast<const float*>(in) + rr * ldx, ldx,
                        h + rr * nt, nt);
    }
  };

  const std::function<void(int64_t)> body = [&](int64_t task) {
    thread_local std::vector<float> hbuf, bbuf;
    thread_local std::vector<scalar_t> ybuf;
    if (task < n1) {  // (1) expert e's W1 rows [o0, o0 + nt), SwiGLU -> a
      const int64_t e = active[task / per_expert1], o0 = (task % per_expert1) * tile1;
      const int64_t nt = std::min(tile1, two_i - o0), r0 = offsets[e], ne = offsets[e + 1] - r0;
      float* h = scratch(hbuf, ne * nt);
      float* b = scratch(bbuf, nt);
      for (int64_t i = 0; i < nt; ++i) b[i] = static_cast<float>(pbias1[e * two_i + o0 + i]);
      const void* in = bf16 ? static_cast<const void*>(xg + r0 * kp1) : xs + r0 * d;
      gemv(pb1 + e * two_i * g1 * 16, ps1 + e * two_i * g1, g1, o0, nt, in, bf16 ? kp1 : d, ne, h);
      for (int64_t r = 0; r < ne; ++r) swiglu_row(h + r * nt, a + (r0 + r) * inter + o0 / 2, nt / 2, alpha, limit, b);
    } else if (task < n1 + n1b) {  // (1b) grouped row r of a -> the direct kernels' layout
      const int64_t r = task - n1;
      split(a + r * inter, r, inter, ap, kp2, as);
    } else {  // (2) output columns [c0, c0 + nc): W2 of every selected expert, bias, combine
      const int64_t c0 = (task - n1 - n1b) * tile2, nc = std::min(tile2, d - c0);
      float* h = scratch(hbuf, kDirectMaxRows * nc);
      float* b = scratch(bbuf, nc);
      scalar_t* y = scratch(ybuf, n * nc);
      for (int64_t e : active) {
        const int64_t r0 = offsets[e], ne = offsets[e + 1] - r0;
        for (int64_t i = 0; i < nc; ++i) b[i] = static_cast<float>(pbias2[e * d + c0 + i]);
        const void* in = bf16 ? static_cast<const void*>(ap + r0 * kp2) : as + r0 * inter;
        gemv(pb2 + e * d * g2 * 16, ps2 + e * d * g2, g2, c0, nc, in, bf16 ? kp2 : inter, ne, h);
        for (int64_t r = 0; r < ne; ++r) bias_row(h + r * nc, y + (r0 + r) * nc, nc, b);
      }
      for (int64_t i = 0; i < t; ++i)  // moe_combine: float sum over the slots in order, one rounding
        for_vec(nc, [&](int64_t c, int64_t nv) {
          fVec sum(0.f);
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t* yr = y + static_cast<int64_t>(row_of[i * k + j]) * nc + c;
            sum = at::vec::fmadd(fVec(w[i * k + j]), nv == kVecSize ? load_f(yr) : load_f(yr, nv), sum);
          }
          store_f(po + i * d + c0 + c, sum, nv);
        });
    }
  };
  run_phased({n1, n1 + n1b, n1 + n1b + n2}, body);
}

at::Tensor moe_experts_mxfp4(const at::Tensor& x_in, const at::Tensor& logits_in, int64_t k,
                             const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales, const at::Tensor& mlp1_bias,
                             const at::Tensor& mlp2_blocks, const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias,
                             double alpha, double limit) {
  if (x_in.dim() == 2 && x_in.size(0) > kDirectMaxRows)
    return moe_experts_mxfp4_ops(x_in, logits_in, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                                 mlp2_bias, alpha, limit);
  check_moe_experts_mxfp4(x_in, logits_in, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                          alpha, limit);
  const at::Tensor x = x_in.contiguous(), logits = logits_in.contiguous();
  const at::Tensor b1 = mlp1_blocks.contiguous(), s1 = mlp1_scales.contiguous(), bias1 = mlp1_bias.contiguous();
  const at::Tensor b2 = mlp2_blocks.contiguous(), s2 = mlp2_scales.contiguous(), bias2 = mlp2_bias.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.size(0) == 0) return out;
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "moe_experts_mxfp4", [&] {
    experts_decode<scalar_t>(x, logits, k, b1.const_data_ptr<uint8_t>(), s1.const_data_ptr<uint8_t>(),
                             bias1.const_data_ptr<scalar_t>(), b2.const_data_ptr<uint8_t>(),
                             s2.const_data_ptr<uint8_t>(), bias2.const_data_ptr<scalar_t>(), b1.size(1),
                             static_cast<float>(alpha), clamp_limit(limit), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) {
  m.impl("mxfp4_dequantize", &mxfp4_dequantize);
  m.impl("mxfp4_quantize", &mxfp4_quantize);
  m.impl("moe_grouped_gemm_mxfp4", &moe_grouped_gemm_mxfp4);
  m.impl("moe_experts_mxfp4", &moe_experts_mxfp4);
}

}  // namespace gptoss::cpu
