#pragma once
// Element-wise MoE math shared by the CPU and CUDA kernels (spec §2.4 step 4, §3.2). Scalar
// forms; the CPU kernels vectorise the same formulas and fall back to these for tails and float64.
#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GPTOSS_MOE_EXP(x) exp(x)
#else
#include <cmath>
#define GPTOSS_MOE_EXP(x) std::exp(x)
#endif

namespace gptoss {

// ---------------------------------------------------------------------------------- SwiGLU
// gpt-oss clamped SwiGLU of one interleaved pair (glu = even column, lin = odd column):
// g = min(glu, limit); l = clamp(lin, -limit, limit); out = g * sigmoid(alpha * g) * (l + 1).
// limit = +inf disables both clamps. T is float or double.
template <typename T>
GPTOSS_HD T swiglu_fwd(T glu, T lin, T alpha, T limit) {
  const T g = glu > limit ? limit : glu;  // NaN stays NaN (as torch.clamp)
  const T l = lin < -limit ? -limit : (lin > limit ? limit : lin);
  const T sig = T(1) / (T(1) + GPTOSS_MOE_EXP(-alpha * g));
  return g * sig * (l + T(1));
}

// Gradients of swiglu_fwd w.r.t. glu and lin, given the output gradient dy. A clamped input has
// zero gradient: glu >= limit, lin >= limit or lin <= -limit (at exactly +-limit the gradient is
// 0, as torch.clamp's backward gives in torch 2.14; torch 2.11's passed it there).
// d/dg [g * s(a g)] = s + a g s (1 - s), s = sigmoid(a g).
template <typename T>
GPTOSS_HD void swiglu_bwd(T glu, T lin, T alpha, T limit, T dy, T* dglu, T* dlin) {
  const bool g_clamped = glu >= limit;
  const bool l_clamped = lin >= limit || lin <= -limit;
  const T g = g_clamped ? limit : glu;
  const T l = l_clamped ? (lin > 0 ? limit : -limit) : lin;
  const T sig = T(1) / (T(1) + GPTOSS_MOE_EXP(-alpha * g));
  const T swish = g * sig;
  const T dswish = sig + alpha * swish * (T(1) - sig);
  *dglu = g_clamped ? T(0) : dy * (l + T(1)) * dswish;
  *dlin = l_clamped ? T(0) : dy * swish;
}

// ----------------------------------------------------------------------------------- MXFP4
// E2M1 nibble -> twice its value, i.e. 2 * FP4_VALUES[nibble] in {0, 1, 2, 3, 4, 6, 8, 12} with
// bit 3 as the sign (nibble 8 is -0). Bits 2-1 are the exponent (bias 1), bit 0 the mantissa;
// exponent 0 is subnormal. Computed from the bits, no table: magnitude index m = nibble & 7 gives
// 2*value = m for m < 4 (0, 0.5, 1, 1.5 doubled), else (2 + (m & 1)) << ((m >> 1) - 1).
GPTOSS_HD float e2m1_twice(uint32_t nibble) {
  const uint32_t m = nibble & 7u;
  const float mag = m < 4u ? static_cast<float>(m) : static_cast<float>((2u + (m & 1u)) << ((m >> 1) - 1u));
  return (nibble & 8u) ? -mag : mag;
}

// E2M1 nibble -> FP4_VALUES[nibble] (0.5 * e2m1_twice, exact).
GPTOSS_HD float e2m1_value(uint32_t nibble) { return 0.5f * e2m1_twice(nibble); }

GPTOSS_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)  // device pass; the host pass of nvcc takes the memcpy
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// E8M0 scale byte s (bias 127) -> 2^(s - 127) as a float, by placing s in the exponent field
// (uint32(s) << 23). s = 0 is 2^-127, a float subnormal (bits 1 << 22): the bit trick would give 0,
// so it is special-cased. s = 255 means 2^128, which float cannot hold: +inf here (the bit
// pattern 0xFF << 23). Decoders use e8m0_half_scale with e2m1_twice instead, which stays finite.
GPTOSS_HD float e8m0_scale(uint32_t s) { return s == 0u ? float_from_bits(1u << 22) : float_from_bits(s << 23); }

// 2^(s - 128), finite for every byte: s = 0 -> 2^-128 (bits 1 << 21), s = 1 -> 2^-127
// (bits 1 << 22), s >= 2 -> exponent field s - 1. e2m1_twice(n) * e8m0_half_scale(s) is exactly
// FP4_VALUES[n] * 2^(s - 127) whenever that is within float's range (and +-inf beyond it, e.g.
// s = 255 with |value| >= 1, as the reference gives); nibble 0 with s = 255 gives 0, not NaN.
GPTOSS_HD float e8m0_half_scale(uint32_t s) {
  return s >= 2u ? float_from_bits((s - 1u) << 23) : float_from_bits(1u << (21u + s));
}

// CUDA note: --use_fast_math (-ftz=true) flushes float subnormals in arithmetic, which would turn
// subnormal scales and products (scale bytes <= 2 or so) into 0; a kernel that must match the CPU
// there compiles without ftz (or assembles those values from bits).

// Eight E2M1 nibbles (element i = bits 4i..4i+3) -> four bfloat16x2 words holding FP4_VALUES *
// 2^-126 exactly, by bit placement alone: magnitude bits e1 e0 m go to bf16 bits 8..6 (exponent
// field e, mantissa MSB m: 2^(e-127) (1 + m/2) for e > 0, and the subnormal m 2^-127 for e = 0),
// the sign to bit 15. Pair order: out[j] = (element j, element j + 4), j = 0..3, element j in the
// low half. 15 integer operations, no tables. Times 2^(s - 1) (a bfloat16 multiply, which keeps
// subnormals) that is the MXFP4 value at scale byte s: a single factor for s <= 128, two beyond.
GPTOSS_HD void mxfp4_decode8_pow126_bf16(uint32_t w, uint32_t (&out)[4]) {
  out[0] = ((w << 6) & 0x01C001C0u) | ((w << 12) & 0x80008000u);
  out[1] = ((w << 2) & 0x01C001C0u) | ((w << 8) & 0x80008000u);
  out[2] = ((w >> 2) & 0x01C001C0u) | ((w << 4) & 0x80008000u);
  out[3] = ((w >> 6) & 0x01C001C0u) | (w & 0x80008000u);
}

// One decoded MXFP4 element: FP4_VALUES[nibble] * 2^(scale - 127), exact (see above).
GPTOSS_HD float mxfp4_value(uint32_t nibble, uint32_t scale) {
  return e2m1_twice(nibble) * e8m0_half_scale(scale);
}

}  // namespace gptoss

#undef GPTOSS_MOE_EXP
