// RMSNorm on CUDA (spec §2.1), same contract as csrc/cpu/rms_norm.cpp: x [..., d] any float dtype,
// scale [d] used in float32 (float64 for float64 x); out like x (contiguous), rstd x.shape[:-1]
// float32 (float64). Math in the accumulation dtype via common/rms_norm.h. add_rms_norm runs the
// same kernels on x + residual (rounded to x's dtype, also written out as `sum`).
//
// Forward: one row per thread group of tpr threads (a block, or a slice of a warp for short rows),
// 16-byte loads/stores when the pointers are aligned and d is a multiple of the vector width
// (scalar otherwise), the row kept in registers between the sum of squares and the scaling pass.
// Rows too long for registers, and float64, take a streaming kernel that reads the row twice.
// Backward: the same row mapping over a grid-stride loop of rows; each row slot accumulates its
// grad_scale partial sums in registers (or in its own row of a zeroed buffer for the streaming
// kernel), then a column-sum kernel adds the [slots, d] partials in a fixed order. No atomics:
// results are deterministic for a given device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "common/dispatch.h"
#include "common/rms_norm.h"
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

// Vectors per thread tried for the register-resident kernels (ascending).
constexpr int kFwdVpts[] = {1, 2, 4, 8};
constexpr int kBwdVpts[] = {1, 2, 4};
constexpr int kFwdMaxTpr = 512;   // forward rows up to 8 * 512 vectors stay in registers
constexpr int kBwdMaxTpr = 512;   // backward rows up to 4 * 512 vectors
constexpr int kStreamMaxTpr = 1024;
// Backward: at least this many rows per row slot (bounds the partial-sum traffic to a few % of
// the row traffic).
constexpr int64_t kBwdMinRowsPerSlot = 8;

// ------------------------------------------------------------------------------------- forward

// x, y: [rows, d] contiguous; w [d] float32; rstd [rows]. Block (tpr, rpb), one row per threadIdx.y,
// VW elements per vector (x, y 16-byte aligned and d % VW == 0 when VW > 1; w 16-byte aligned
// when VW >= 4), at most VPT vectors per thread (tpr * VPT >= d / VW).
// add_rms_norm: res and sum like x (same alignment), the row normalised is x + res rounded to T,
// written to sum; both null for rms_norm.
template <typename T, int VW, int VPT>
__global__ void __launch_bounds__(VPT == 8 ? kFwdMaxTpr : 256)
    rms_norm_fwd_reg_kernel(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
                            T* __restrict__ y, T* __restrict__ sum, float* __restrict__ rstd, int64_t rows, int d,
                            float eps) {
  using V = Vec<T, VW>;
  __shared__ float red[32];
  const int nvec = d / VW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t base = (valid ? row : 0) * nvec;
  const V* xr = reinterpret_cast<const V*>(x) + base;

  // Slots past the row's end (or of a row past the end) hold zeros, which add nothing below.
  V v[VPT];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    v[k] = valid && j < nvec ? xr[j] : V{};
  }
  if (res != nullptr) {  // grid-uniform
    const V* rr = reinterpret_cast<const V*>(res) + base;
    V* sr = reinterpret_cast<V*>(sum) + base;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (valid && j < nvec) {
        const V r = rr[j];
#pragma unroll
        for (int e = 0; e < VW; ++e) v[k].v[e] = static_cast<T>(static_cast<float>(v[k].v[e]) + static_cast<float>(r.v[e]));
        sr[j] = v[k];
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const float f = static_cast<float>(v[k].v[e]);
      ss = fmaf(f, f, ss);
    }
  const float rs = rms_norm_rstd(row_sum(ss, red), d, eps);
  if (!valid) return;
  if (threadIdx.x == 0) rstd[row] = rs;
  V* yr = reinterpret_cast<V*>(y) + row * nvec;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      float wv[VW];
      load_n<VW>(w + j * VW, wv);
      V o;
#pragma unroll
      for (int e = 0; e < VW; ++e) o.v[e] = static_cast<T>(rms_norm_out(static_cast<float>(v[k].v[e]), rs, wv[e]));
      yr[j] = o;
    }
  }
}

// Streaming forward (any row length; also float64): the row is read twice. Same layout contract as
// the register kernel, with w and rstd in the accumulation dtype A.
// With res (add_rms_norm) the first pass writes sum = x + res rounded to T and the second reads
// the thread's own sum elements back.
template <typename T, int VW>
__global__ void __launch_bounds__(kStreamMaxTpr)
    rms_norm_fwd_stream_kernel(const T* x, const T* res, const acc_t<T>* __restrict__ w, T* __restrict__ y, T* sum,
                               acc_t<T>* __restrict__ rstd, int64_t rows, int d, acc_t<T> eps) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  __shared__ A red[32];
  const int nvec = d / VW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t base = (valid ? row : 0) * nvec;
  const V* xr = reinterpret_cast<const V*>(x) + base;
  const V* rr = res != nullptr ? reinterpret_cast<const V*>(res) + base : nullptr;
  V* sr = res != nullptr ? reinterpret_cast<V*>(sum) + base : nullptr;
  A ss = 0;
  if (valid) {
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      V v = xr[j];
      if (rr != nullptr) {
        const V r = rr[j];
#pragma unroll
        for (int e = 0; e < VW; ++e) v.v[e] = static_cast<T>(static_cast<A>(v.v[e]) + static_cast<A>(r.v[e]));
        sr[j] = v;
      }
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const A f = static_cast<A>(v.v[e]);
        ss += f * f;
      }
    }
  }
  const A rs = rms_norm_rstd(row_sum(ss, red), d, eps);
  if (!valid) return;
  if (threadIdx.x == 0) rstd[row] = rs;
  V* yr = reinterpret_cast<V*>(y) + row * nvec;
  const V* src = sr != nullptr ? sr : xr;
  for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
    const V v = src[j];
    A wv[VW];
    load_n<VW>(w + j * VW, wv);
    V o;
#pragma unroll
    for (int e = 0; e < VW; ++e) o.v[e] = static_cast<T>(rms_norm_out(static_cast<A>(v.v[e]), rs, wv[e]));
    yr[j] = o;
  }
}

template <typename T, int VW>
void launch_fwd(const T* x, const T* res, const acc_t<T>* w, T* y, T* sum, acc_t<T>* rstd, int64_t rows, int d,
                double eps, cudaStream_t stream) {
  const int64_t nvec = d / VW;
  RowShape s;
  if constexpr (std::is_same_v<T, double>) {
    s = stream_row_shape(nvec, kStreamMaxTpr);
  } else {
    if (pick_row_shape(nvec, kFwdVpts, kFwdMaxTpr, s)) {
      const dim3 block(s.tpr, s.rpb), grid(grid_x(ceil_div(rows, s.rpb), "rms_norm"));
      const float e = static_cast<float>(eps);
      auto run = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(x, res, w, y, sum, rstd, rows, d, e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (s.vpt) {
        case 1: run(rms_norm_fwd_reg_kernel<T, VW, 1>); break;
        case 2: run(rms_norm_fwd_reg_kernel<T, VW, 2>); break;
        case 4: run(rms_norm_fwd_reg_kernel<T, VW, 4>); break;
        default: run(rms_norm_fwd_reg_kernel<T, VW, 8>); break;
      }
      return;
    }
    s = stream_row_shape(nvec, kStreamMaxTpr);
  }
  const dim3 block(s.tpr, s.rpb), grid(grid_x(ceil_div(rows, s.rpb), "rms_norm"));
  rms_norm_fwd_stream_kernel<T, VW><<<grid, block, 0, stream>>>(x, res, w, y, sum, rstd, rows, d,
                                                                 static_cast<acc_t<T>>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------ backward

// dy, x, dx: [rows, d] contiguous; w [d] float32; rstd [rows] float32; partial [gridDim.x * rpb, d]
// float32, one row per row slot (blockIdx.x, threadIdx.y), fully written. Rows are visited in a
// grid-stride loop by row slot. Vector/alignment contract as the forward register kernel.
template <typename T, int VW, int VPT>
__global__ void __launch_bounds__(VPT == 4 ? kBwdMaxTpr : 256)
    rms_norm_bwd_reg_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ partial,
                            int64_t rows, int d) {
  using V = Vec<T, VW>;
  __shared__ float red[2][32];
  const int nvec = d / VW;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t nslots = static_cast<int64_t>(gridDim.x) * blockDim.y;
  float gw[VPT][VW];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int e = 0; e < VW; ++e) gw[k][e] = 0.f;

  int buf = 0;
  // The loop bound is the same for every thread of the block (row_sum synchronises).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += nslots) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const float rs = valid ? rstd[row] : 0.f;
    const V* xr = reinterpret_cast<const V*>(x) + (valid ? row : 0) * nvec;
    const V* gr = reinterpret_cast<const V*>(dy) + (valid ? row : 0) * nvec;
    // Slots past the row's end (or of a row past the end) hold zeros, which add nothing below.
    V xv[VPT], gv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      const bool in = valid && j < nvec;
      xv[k] = in ? xr[j] : V{};
      gv[k] = in ? gr[j] : V{};
    }
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      float wv[VW];
      if (j < nvec) {
        load_n<VW>(w + j * VW, wv);
      } else {
#pragma unroll
        for (int e = 0; e < VW; ++e) wv[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float g = static_cast<float>(gv[k].v[e]);
        const float xh = static_cast<float>(xv[k].v[e]) * rs;
        gw[k][e] = fmaf(g, xh, gw[k][e]);
        acc = fmaf(g * wv[e], xh, acc);
      }
    }
    const float mean = row_sum(acc, red[buf]) / static_cast<float>(d);
    buf ^= 1;
    if (valid) {
      V* dr = reinterpret_cast<V*>(dx) + row * nvec;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
          float wv[VW];
          load_n<VW>(w + j * VW, wv);
          V o;
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            const float g = static_cast<float>(gv[k].v[e]) * wv[e];
            const float xh = static_cast<float>(xv[k].v[e]) * rs;
            o.v[e] = static_cast<T>(rms_norm_grad_x(g, xh, rs, mean));
          }
          dr[j] = o;
        }
      }
    }
  }
  float* pr = partial + slot * d;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) store_n<VW>(pr + j * VW, gw[k]);
  }
}

// Streaming backward (any row length; also float64): rows read twice; each row slot accumulates
// grad_scale into its own row of `partial` ([gridDim.x * rpb, d], zero on entry; each column of a
// slot's row is owned by one thread, so no races).
template <typename T, int VW>
__global__ void __launch_bounds__(kStreamMaxTpr)
    rms_norm_bwd_stream_kernel(const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ w,
                               const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,
                               acc_t<T>* __restrict__ partial, int64_t rows, int d) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  __shared__ A red[2][32];
  const int nvec = d / VW;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t nslots = static_cast<int64_t>(gridDim.x) * blockDim.y;
  A* pr = partial + slot * d;
  int buf = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += nslots) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const A rs = valid ? rstd[row] : A(0);
    const V* xr = reinterpret_cast<const V*>(x) + (valid ? row : 0) * nvec;
    const V* gr = reinterpret_cast<const V*>(dy) + (valid ? row : 0) * nvec;
    A acc = 0;
    if (valid) {
      for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        const V xv = xr[j], gv = gr[j];
        A wv[VW], pv[VW];
        load_n<VW>(w + j * VW, wv);
        load_n<VW>(pr + j * VW, pv);
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const A g = static_cast<A>(gv.v[e]);
          const A xh = static_cast<A>(xv.v[e]) * rs;
          pv[e] += g * xh;
          acc += g * wv[e] * xh;
        }
        store_n<VW>(pr + j * VW, pv);
      }
    }
    const A mean = row_sum(acc, red[buf]) / static_cast<A>(d);
    buf ^= 1;
    if (valid) {
      V* dr = reinterpret_cast<V*>(dx) + row * nvec;
      for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        const V xv = xr[j], gv = gr[j];
        A wv[VW];
        load_n<VW>(w + j * VW, wv);
        V o;
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const A g = static_cast<A>(gv.v[e]) * wv[e];
          const A xh = static_cast<A>(xv.v[e]) * rs;
          o.v[e] = static_cast<T>(rms_norm_grad_x(g, xh, rs, mean));
        }
        dr[j] = o;
      }
    }
  }
}

// out[c] = sum over p of partial[p, c], p ascending within each of the 16 threadIdx.y lanes, then
// the 16 lane sums in order. Block (32, 16), grid ceil(d / 32).
template <typename A>
__global__ void __launch_bounds__(512)
    column_sum_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t P, int d) {
  __shared__ A s[16][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  A acc = 0;
  if (c < d)
    for (int64_t p = threadIdx.y; p < P; p += 16) acc += partial[p * d + c];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    A t = s[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < 16; ++i) t += s[i][threadIdx.x];
    out[c] = t;
  }
}

// Row slots for a grid-stride backward kernel: enough blocks to fill the device, but at least
// kBwdMinRowsPerSlot rows per slot.
template <typename K>
int64_t bwd_blocks(K kernel, const RowShape& s, int64_t rows) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, s.tpr * s.rpb, 0));
  const int64_t groups = ceil_div(rows, s.rpb);
  int64_t n = std::min<int64_t>(groups, static_cast<int64_t>(std::max(per_sm, 1)) * sm_count());
  return std::max<int64_t>(1, std::min(n, ceil_div(groups, kBwdMinRowsPerSlot)));
}

// Returns grad_scale in the accumulation dtype, [d].
template <typename T, int VW>
at::Tensor launch_bwd(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* rstd, T* dx, int64_t rows,
                      int d, const at::TensorOptions& acc_opts, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t nvec = d / VW;
  RowShape s;
  at::Tensor partial;
  int64_t nblocks = 0;
  bool launched = false;
  if constexpr (!std::is_same_v<T, double>) {
    if (pick_row_shape(nvec, kBwdVpts, kBwdMaxTpr, s)) {
      auto go = [&](auto kernel) {
        nblocks = bwd_blocks(kernel, s, rows);
        partial = at::empty({nblocks * s.rpb, d}, acc_opts);
        kernel<<<grid_x(nblocks, "rms_norm_backward"), dim3(s.tpr, s.rpb), 0, stream>>>(
            dy, x, w, rstd, dx, partial.mutable_data_ptr<float>(), rows, d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (s.vpt) {
        case 1: go(rms_norm_bwd_reg_kernel<T, VW, 1>); break;
        case 2: go(rms_norm_bwd_reg_kernel<T, VW, 2>); break;
        default: go(rms_norm_bwd_reg_kernel<T, VW, 4>); break;
      }
      launched = true;
    }
  }
  if (!launched) {
    s = stream_row_shape(nvec, kStreamMaxTpr);
    nblocks = bwd_blocks(rms_norm_bwd_stream_kernel<T, VW>, s, rows);
    partial = at::zeros({nblocks * s.rpb, d}, acc_opts);
    rms_norm_bwd_stream_kernel<T, VW><<<grid_x(nblocks, "rms_norm_backward"), dim3(s.tpr, s.rpb), 0, stream>>>(
        dy, x, w, rstd, dx, partial.mutable_data_ptr<A>(), rows, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor gw = at::empty({d}, acc_opts);
  column_sum_kernel<A><<<grid_x(ceil_div(d, 32), "rms_norm_backward"), dim3(32, 16), 0, stream>>>(
      partial.const_data_ptr<A>(), gw.mutable_data_ptr<A>(), partial.size(0), d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gw;
}

// ---------------------------------------------------------------------------------------- ops

void check_row_len(int64_t d, const char* op) {
  TORCH_CHECK(d <= std::numeric_limits<int32_t>::max(), op, ": x's last dim must be < 2^31 on CUDA, got ", d);
}

// rms_norm (res undefined) and add_rms_norm: returns out, sum (undefined for rms_norm), rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x_in, const at::Tensor& res_in,
                                                            const at::Tensor& scale, double eps, const char* op) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const bool add = res_in.defined();
  const at::Tensor res = add ? res_in.contiguous() : at::Tensor();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_row_len(d, op);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = scale.to(acc).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor sum = add ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc));
  if (rows == 0) return {y, sum, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int di = static_cast<int>(d);
  if (x.scalar_type() == at::kDouble) {
    launch_fwd<double, 1>(x.const_data_ptr<double>(), add ? res.const_data_ptr<double>() : nullptr,
                          w.const_data_ptr<double>(), y.mutable_data_ptr<double>(),
                          add ? sum.mutable_data_ptr<double>() : nullptr, rstd.mutable_data_ptr<double>(), rows, di,
                          eps, stream);
    return {y, sum, rstd};
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm_cuda", [&] {
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = d % VW == 0 && is_aligned(x.const_data_ptr(), 16) && is_aligned(w.const_data_ptr(), 16) &&
                     (!add || is_aligned(res.const_data_ptr(), 16));
    auto run = [&](auto vw) {
      launch_fwd<scalar_t, decltype(vw)::value>(x.const_data_ptr<scalar_t>(),
                                               add ? res.const_data_ptr<scalar_t>() : nullptr,
                                               w.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(),
                                               add ? sum.mutable_data_ptr<scalar_t>() : nullptr,
                                               rstd.mutable_data_ptr<float>(), rows, di, eps, stream);
    };
    if (vec) run(std::integral_constant<int, VW>{});
    else run(std::integral_constant<int, 1>{});
  });
  return {y, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  check_rms_norm(x, scale, eps);
  auto [y, sum, rstd] = norm_forward(x, at::Tensor(), scale, eps, "rms_norm");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& scale, double eps) {
  check_add_rms_norm(x, residual, scale, eps);
  return norm_forward(x, residual, scale, eps, "add_rms_norm");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                     const at::Tensor& scale, const at::Tensor& rstd_in) {
  check_rms_norm_backward(grad_out, x_in, scale, rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = grad_out.contiguous(), rstd = rstd_in.contiguous();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_row_len(d, "rms_norm_backward");
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = scale.to(acc).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (rows == 0) return {dx, at::zeros({d}, scale.options())};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int di = static_cast<int>(d);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor gw;
  if (x.scalar_type() == at::kDouble) {
    gw = launch_bwd<double, 1>(dy.const_data_ptr<double>(), x.const_data_ptr<double>(), w.const_data_ptr<double>(),
                               rstd.const_data_ptr<double>(), dx.mutable_data_ptr<double>(), rows, di, acc_opts,
                               stream);
  } else {
    GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm_backward_cuda", [&] {
      constexpr int VW = kVec16<scalar_t>;
      const bool vec = d % VW == 0 && is_aligned(x.const_data_ptr(), 16) && is_aligned(dy.const_data_ptr(), 16) &&
                       is_aligned(w.const_data_ptr(), 16);
      auto run = [&](auto vw) {
        gw = launch_bwd<scalar_t, decltype(vw)::value>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
            rstd.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(), rows, di, acc_opts, stream);
      };
      if (vec) run(std::integral_constant<int, VW>{});
      else run(std::integral_constant<int, 1>{});
    });
  }
  return {dx, gw.to(scale.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace gptoss::cuda
