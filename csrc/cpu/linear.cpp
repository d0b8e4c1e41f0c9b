// Dense projection y = x W^T + b on the CPU (the qkv, out, router and unembedding projections of
// gpt-oss, spec §2). x [..., K]; weight [N, K]; bias [N] or None; y [..., N] in x's dtype.
//
// Decode-shaped calls (at most kMaxRows = 4 rows of x, bfloat16 x and weight, weight row-major,
// bias bfloat16 or None, a CPU with AVX512-BF16) stream the weight once: each task takes 4 weight
// rows at a time, multiplies 32 bfloat16 of each against every x row with vdpbf16ps (exact
// products, float32 sums) and prefetches the weight rows 1 KB ahead. These calls are bound by the
// weight's bytes: at 1 row oneDNN's GEMV reached 0.6-0.9 of the copy bandwidth, this loop 1.0
// (benchmarks/bench_linear.py). From 5 rows on the loop turns bound by its x loads and oneDNN is
// faster, so everything else (more rows, float32, float16, float64) is at::linear.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/vec.h"
#include "ops.h"

namespace gptoss::cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMaxRows = 4;

#define GPTOSS_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// acc[m][r] += x[m, k .. k+31] . w_r[k .. k+31] (LAST: only the K % 32 elements of the tail).
template <int M, int R, bool LAST>
GPTOSS_LINEAR_TARGET inline void gemv_step(const at::BFloat16* x, int64_t K, const at::BFloat16* const (&wr)[R],
                                           int64_t k, __mmask32 tail, __m512 (&acc)[M][R]) {
  constexpr int64_t kPrefetch = 512;  // elements (1 KB) ahead in each weight row
  __m512i xv[M];
  for (int m = 0; m < M; ++m)
    xv[m] = LAST ? _mm512_maskz_loadu_epi16(tail, x + m * K + k) : _mm512_loadu_si512(x + m * K + k);
  for (int r = 0; r < R; ++r) {
    __m512i wv;
    if constexpr (LAST) {
      wv = _mm512_maskz_loadu_epi16(tail, wr[r] + k);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + kPrefetch), _MM_HINT_T0);
      wv = _mm512_loadu_si512(wr[r] + k);
    }
    for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv[m], (__m512bh)wv);
  }
}

// y[m, n] for n in [n0, n1), m < M: x [M, K] (row stride K), w [N, K], y [M, ldy]; the float32
// sum plus the bias is rounded to bfloat16 once.
template <int M, int R>
GPTOSS_LINEAR_TARGET void gemv_rows(const at::BFloat16* x, int64_t K, const at::BFloat16* w, int64_t n0, int64_t n1,
                                    const at::BFloat16* bias, at::BFloat16* y, int64_t ldy) {
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (K % 32)) - 1);
  for (int64_t n = n0; n < n1; n += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n1 - n));
    const at::BFloat16* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n + std::min(r, rows - 1)) * K;  // a short group repeats its last row
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) gemv_step<M, R, false>(x, K, wr, k, tail, acc);
    if (k < K) gemv_step<M, R, true>(x, K, wr, k, tail, acc);
    for (int r = 0; r < rows; ++r) {
      const float b = bias != nullptr ? static_cast<float>(bias[n + r]) : 0.f;
      for (int m = 0; m < M; ++m) y[m * ldy + n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[m][r]) + b);
    }
  }
}

// y [M, N] bfloat16 = x [M, K] w^T + bias, M in [1, kMaxRows].
void gemv_bf16(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, int64_t N,
               const at::BFloat16* bias, at::BFloat16* y) {
  constexpr int64_t kRowsPerTask = 64;  // ~370 KB of weight per task at K = 2880
  at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kRowsPerTask, n1 = std::min(N, t1 * kRowsPerTask);
    switch (M) {
      case 1: gemv_rows<1, 4>(x, K, w, n0, n1, bias, y, N); break;
      case 2: gemv_rows<2, 4>(x, K, w, n0, n1, bias, y, N); break;
      case 3: gemv_rows<3, 4>(x, K, w, n0, n1, bias, y, N); break;
      default: gemv_rows<4, 4>(x, K, w, n0, n1, bias, y, N); break;
    }
  });
}

bool use_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t K = weight.size(1), M = K > 0 ? x.numel() / K : 0;
  return cpu_has_avx512_bf16() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
         (!bias.has_value() || !bias->defined() || bias->scalar_type() == at::kBFloat16) && weight.is_contiguous() &&
         M >= 1 && M <= kMaxRows;
}
#endif

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
#if defined(CPU_CAPABILITY_AVX512)
  if (use_gemv(x, weight, bias)) {
    const int64_t K = weight.size(1), N = weight.size(0), M = x.numel() / K;
    const at::Tensor xc = x.contiguous();
    const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    auto shape = x.sizes().vec();
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    gemv_bf16(xc.const_data_ptr<at::BFloat16>(), M, K, weight.const_data_ptr<at::BFloat16>(), N,
              bc.defined() ? bc.const_data_ptr<at::BFloat16>() : nullptr, y.mutable_data_ptr<at::BFloat16>());
    return y;
  }
#endif
  return at::linear(x, weight, bias).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) { m.impl("linear", &linear); }

}  // namespace gptoss::cpu
