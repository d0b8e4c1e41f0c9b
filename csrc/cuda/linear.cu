// Dense projection y = x W^T + b on CUDA (contract in registration.cpp: float32 sums, one rounding).
//
// Decode-shaped calls (at most kMaxRows = 4 rows of x; bfloat16 or float16; K % 8 == 0; x, weight
// and bias contiguous with 16-byte aligned x and weight) go to linear_gemv_kernel, which streams the
// weight once: one warp per kRows = 2 weight rows, each lane loading 16 bytes (8 elements) of both
// rows per step with kUnroll = 4 steps in flight, the same 8 elements of every x row (L1/L2 hits:
// every warp reads the same x), float32 FMAs, a warp-shuffle sum, then bias and one rounding. cuBLAS
// picks split-K kernels plus a separate reduce for these shapes (two launches, ~0.6 of the copy
// bandwidth at one row on an H200, docs/performance.md).
// Everything else is cuBLAS through at::linear, with reduced-precision split-K reductions switched
// off for the call (torch allows them for bfloat16 and float16 by default; they round partial sums
// to the output dtype, which breaks the one-rounding contract: a [8, 4096] x [4096, 33] bfloat16
// product was 0.09 off).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

constexpr int64_t kMaxRows = 4;
constexpr int kRows = 2;      // weight rows per warp
constexpr int kUnroll = 4;    // 16-byte steps in flight per weight row and lane
constexpr int kWarps = 8;     // warps per block

// Eight 16-bit floats (one 16-byte load) -> float32.
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&f)[8]) {
  const Vec<T, 8> v = *reinterpret_cast<const Vec<T, 8>*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(v.v[i]);
}

// y [M, N] = x [M, K] w[N, K]^T + bias: M <= kMaxRows, K % 8 == 0, 16-byte aligned x and w. Warp
// gw owns weight rows kRows * gw .. + kRows - 1; lane l takes the 8-element chunks c = l, l + 32, ...
template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
    linear_gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                       T* __restrict__ y, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRows;
  const int64_t chunks = K / 8;
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r)  // a row past N re-reads row n0 (its sums are not written)
    wr[r] = reinterpret_cast<const uint4*>(w + (n0 + r < N ? n0 + r : n0) * K);
  // The warp's weight rows (up to 16 KB of each) are requested into L2 ahead of the streaming loads
  // below: more bytes in flight than the loop's kUnroll steps alone.
  if (n0 < N) {
    const int64_t pf = chunks < 1024 ? chunks : 1024;
    for (int64_t c = lane * 4; c < pf; c += 128)  // one 64-byte line (4 chunks) per prefetch
#pragma unroll
      for (int r = 0; r < kRows; ++r) prefetch_l2(wr[r] + c);
  }
  if (n0 >= N) return;  // whole warp
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  float acc[M][kRows];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.f;

  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint4 wv[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[u][r] = c < chunks ? __ldcs(wr[r] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        to_float8<T>(__ldg(xr + m * chunks + c), xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wf[8];
          to_float8<T>(wv[u][r], wf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m][r] = fmaf(xf[i], wf[i], acc[m][r]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = n0 + r;
      if (n >= N) break;
      const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(acc[m][r] + b);
    }
  }
}

template <typename T>
void launch_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& y, int64_t M,
                 cudaStream_t stream) {
  const int64_t N = w.size(0), K = w.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = bias != nullptr ? bias->const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const unsigned blocks = grid_x(ceil_div(N, static_cast<int64_t>(kWarps) * kRows), "linear");
  auto run = [&](auto kernel) {
    kernel<<<blocks, kWarps * 32, 0, stream>>>(xp, wp, bp, yp, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (M) {
    case 1: run(linear_gemv_kernel<T, 1>); break;
    case 2: run(linear_gemv_kernel<T, 2>); break;
    case 3: run(linear_gemv_kernel<T, 3>); break;
    default: run(linear_gemv_kernel<T, 4>); break;
  }
}

// Reduced-precision split-K reductions off for one cuBLAS call, restored on exit. The setting is
// process-wide, so the calls that change it are serialized (two threads interleaving save and
// restore would otherwise leave the user's setting changed).
std::mutex& reduction_setting_mutex() {
  static std::mutex m;
  return m;
}

class FullPrecisionReduction {
 public:
  FullPrecisionReduction()
      : lock_(reduction_setting_mutex()),
        bf16_(at::globalContext().allowBF16ReductionCuBLAS()),
        fp16_(at::globalContext().allowFP16ReductionCuBLAS()) {
    using O = at::CuBLASReductionOption;
    if (bf16_ == O::AllowReducedPrecisionWithSplitK) at::globalContext().setAllowBF16ReductionCuBLAS(false, true);
    if (fp16_ == O::AllowReducedPrecisionWithSplitK) at::globalContext().setAllowFP16ReductionCuBLAS(false, true);
  }
  ~FullPrecisionReduction() {
    using O = at::CuBLASReductionOption;
    if (bf16_ == O::AllowReducedPrecisionWithSplitK) at::globalContext().setAllowBF16ReductionCuBLAS(true, true);
    if (fp16_ == O::AllowReducedPrecisionWithSplitK) at::globalContext().setAllowFP16ReductionCuBLAS(true, true);
  }
  FullPrecisionReduction(const FullPrecisionReduction&) = delete;
  FullPrecisionReduction& operator=(const FullPrecisionReduction&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  at::CuBLASReductionOption bf16_, fp16_;
};

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in) {
  check_linear(x_in, weight, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = K > 0 ? x_in.numel() / K : 0;
  const at::Tensor* bias = bias_in.has_value() && bias_in->defined() ? &*bias_in : nullptr;
  const auto dt = x_in.scalar_type();
  if ((dt == at::kBFloat16 || dt == at::kHalf) && M >= 1 && M <= kMaxRows && N >= 1 && K % 8 == 0 &&
      weight.is_contiguous() && is_aligned(weight.const_data_ptr(), 16) && (bias == nullptr || bias->is_contiguous())) {
    const at::Tensor x = x_in.contiguous();
    if (is_aligned(x.const_data_ptr(), 16)) {
      std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
      shape.back() = N;
      at::Tensor y = at::empty(shape, x_in.options());
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      if (dt == at::kBFloat16) launch_gemv<at::BFloat16>(x, weight, bias, y, M, stream);
      else launch_gemv<at::Half>(x, weight, bias, y, M, stream);
      return y;
    }
  }
  const FullPrecisionReduction full;
  return at::linear(x_in, weight, bias_in).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) { m.impl("linear", &linear); }

}  // namespace gptoss::cuda
