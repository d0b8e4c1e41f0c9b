// Half-split RoPE on CUDA (spec §2.3), same contract as csrc/cpu/rope.cpp: x [B, T, H, D] or
// [T, H, D] any float dtype; cos/sin [T, D/2] or [B, T, D/2] used in float32 (float64 for float64 x);
// output like x, contiguous. The rotation is gptoss::rope_rotate (common/rope.h), as on the CPU.
//
// One thread group of blockDim.x threads per (b, t, h) row of D elements, blockDim.y rows per
// block; each thread rotates VW pairs (i, i + D/2) at a time: 16-byte loads of x when x is 16-byte
// aligned and D/2 is a multiple of VW, scalar otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "common/dispatch.h"
#include "common/rope.h"
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

constexpr int kRopeThreads = 256;

// x, y: [rows = B*Tn*H, 2*half] contiguous; cos/sin: [(B,) Tn, half] contiguous in the accumulation
// dtype A, tab_bstride = Tn*half for per-batch tables, else 0. When VW > 1: x, y, cos, sin 16-byte
// aligned and half % VW == 0.
template <typename T, int VW>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ cos, const acc_t<T>* __restrict__ sin,
                T* __restrict__ y, int64_t rows, int64_t Tn, int64_t H, int half, int64_t tab_bstride) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int64_t p, h, b, t;
  divmod(row, H, p, h);  // p = b * Tn + t
  divmod(p, Tn, b, t);
  const A* c = cos + b * tab_bstride + t * half;
  const A* s = sin + b * tab_bstride + t * half;
  const T* xr = x + row * 2 * half;
  T* yr = y + row * 2 * half;
  const int npv = half / VW;
  for (int j = threadIdx.x; j < npv; j += blockDim.x) {
    const int i = j * VW;
    const V x1 = *reinterpret_cast<const V*>(xr + i);
    const V x2 = *reinterpret_cast<const V*>(xr + half + i);
    A cv[VW], sv[VW];
    load_n<VW>(c + i, cv);
    load_n<VW>(s + i, sv);
    V o1, o2;
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      A r1, r2;
      rope_rotate(static_cast<A>(x1.v[e]), static_cast<A>(x2.v[e]), cv[e], sv[e], r1, r2);
      o1.v[e] = static_cast<T>(r1);
      o2.v[e] = static_cast<T>(r2);
    }
    *reinterpret_cast<V*>(yr + i) = o1;
    *reinterpret_cast<V*>(yr + half + i) = o2;
  }
}

template <typename T, int VW>
void launch_rope(const T* x, const acc_t<T>* cos, const acc_t<T>* sin, T* y, int64_t rows, int64_t Tn, int64_t H,
                 int half, int64_t tab_bstride, cudaStream_t stream) {
  const int npv = half / VW;
  const int bx = std::min(next_pow2(npv), 64);
  const int by = kRopeThreads / bx;
  rope_kernel<T, VW><<<grid_x(ceil_div(rows, by), "apply_rope"), dim3(bx, by), 0, stream>>>(x, cos, sin, y, rows, Tn, H,
                                                                                           half, tab_bstride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor apply_rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_apply_rope(x_in, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor cos = cos_in.to(acc).contiguous(), sin = sin_in.to(acc).contiguous();
  const bool batched = x.dim() == 4;
  const int64_t B = batched ? x.size(0) : 1, Tn = x.size(-3), H = x.size(-2), D = x.size(-1);
  TORCH_CHECK(D <= std::numeric_limits<int32_t>::max(), "apply_rope: head dim D must be < 2^31 on CUDA, got ", D);
  const int half = static_cast<int>(D / 2);
  const int64_t tab_bstride = cos.dim() == 3 ? Tn * half : 0;
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const int64_t rows = B * Tn * H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kDouble) {
    launch_rope<double, 1>(x.const_data_ptr<double>(), cos.const_data_ptr<double>(), sin.const_data_ptr<double>(),
                           y.mutable_data_ptr<double>(), rows, Tn, H, half, tab_bstride, stream);
    return y;
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "apply_rope_cuda", [&] {
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = half % VW == 0 && is_aligned(x.const_data_ptr(), 16) &&
                     is_aligned(cos.const_data_ptr(), 16) && is_aligned(sin.const_data_ptr(), 16);
    auto run = [&](auto vw) {
      launch_rope<scalar_t, decltype(vw)::value>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(),
                                                 sin.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(), rows,
                                                 Tn, H, half, tab_bstride, stream);
    };
    if (vec) run(std::integral_constant<int, VW>{});
    else run(std::integral_constant<int, 1>{});
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) { m.impl("apply_rope", &apply_rope); }

}  // namespace gptoss::cuda
