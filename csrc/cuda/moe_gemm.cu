// Grouped expert GEMM with dense weights on CUDA (moe_grouped_gemm, moe_grouped_gemm_backward);
// contracts in registration.cpp, kernels in cuda/moe_gemm.cuh.
//
// Forward: bfloat16/float16 with K % 8 == 0 and 16-byte aligned x and weight run the tensor-core
// kernel (fp32 accumulation, bias and SwiGLU fused, one rounding); float32, float64 and every other
// case run the SIMT kernel (accumulation in float32, float64 for float64). Unlike the CPU
// bfloat16/float16 path (ATen GEMM rounded before the epilogue), the CUDA result is rounded once.
//
// Backward (SIMT for every dtype, accumulation in acc_t<T>; deterministic, no atomics):
//   grad_x: the grouped GEMM grad_out[r] @ W_e into grad_x directly when row_index is None (rows
//     are distinct), else into a float32 (float64) buffer [N, K], then a segmented sum per x row
//     over its grouped rows in ascending order (the inverse mapping comes from a stable counting
//     sort of row_index); x rows no grouped row reads get 0.
//   grad_weight: one CTA per (expert, 64 x 64 tile of [M, K]) looping over the expert's rows.
//   grad_bias: one thread per (expert, column) looping over the expert's rows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "cuda/moe_common.cuh"  // (includes common/moe_math.h)
#include "cuda/moe_gemm.cuh"
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

void check_cuda_sizes(int64_t n, int64_t m, int64_t k, const char* op) {
  constexpr int64_t lim = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(n < lim && m < lim && k < lim, op, ": N, M and K must be < 2^31-1 on CUDA, got N=", n, ", M=", m,
              ", K=", k);
}

template <typename T>
bool use_tensor_cores(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    return K % 8 == 0 && is_aligned(x.const_data_ptr(), 16) && is_aligned(w.const_data_ptr(), 16) && has_sm80();
  } else {
    return false;
  }
}

// out = the grouped GEMM (see moe_grouped_gemm); x, w, offsets, row_index, bias contiguous.
template <typename T>
void grouped_gemm_forward(const at::Tensor& x, const at::Tensor* ri, const at::Tensor& offsets, const at::Tensor& w,
                          const at::Tensor* bias, bool fused, double alpha, double limit, at::Tensor& out,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t N = out.size(0), E = w.size(0), M = w.size(1), K = w.size(2);
  const bool tc = use_tensor_cores<T>(x, w, K);
  const Schedule sched = make_schedule<T>(offsets, E, N, tc ? kTcBM : kSimtBM, out.mutable_data_ptr<T>(), out.size(1),
                                          stream);
  GemmParams<T, A> p = forward_params<T, A>(x, ri, E, N, K, M, bias, out, alpha, limit);
  p.so = sched.so();
  p.tile_start = sched.tile_start();
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (tc) {
      DenseB<T> b;
      b.w = w.const_data_ptr<T>();
      b.ncols = M;
      b.red = K;
      launch_gemm_tc<T>(p, b, fused, stream);
      return;
    }
  }
  DenseFwdB<T, A> b;
  b.w = w.const_data_ptr<T>();
  b.ncols = M;
  b.red = K;
  launch_gemm_simt<T, A, DenseFwdB<T, A>, T>(p, b, fused, stream);
}

at::Tensor moe_grouped_gemm(const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index_in,
                            const at::Tensor& offsets_in, const at::Tensor& weight_in,
                            const c10::optional<at::Tensor>& bias_in, bool fused_swiglu, double alpha, double limit) {
  const int64_t N = check_moe_grouped_gemm(x_in, row_index_in, offsets_in, weight_in, bias_in, fused_swiglu, alpha,
                                           limit);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), offsets = offsets_in.contiguous();
  const bool has_ri = row_index_in.has_value() && row_index_in->defined();
  const at::Tensor ri = has_ri ? row_index_in->contiguous() : at::Tensor();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t E = w.size(0), M = w.size(1), K = w.size(2);
  check_cuda_sizes(N, M, K, "moe_grouped_gemm");
  const int64_t out_cols = fused_swiglu ? M / 2 : M;
  at::Tensor out = at::empty({N, out_cols}, x.options());
  if (N == 0 || out_cols == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_grouped_gemm_cuda", [&] {
    grouped_gemm_forward<scalar_t>(x, has_ri ? &ri : nullptr, offsets, w, has_bias ? &bias : nullptr, fused_swiglu,
                                   alpha, limit, out, stream);
  });
  return out;
}

// ------------------------------------------------------------------------------------ backward

// gx[row, k] = sum over i in [starts[row], starts[row+1]) of G[perm[i], k], in order; [R, K].
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    segment_sum_kernel(const A* __restrict__ G, const int32_t* __restrict__ perm, const int32_t* __restrict__ starts,
                       int64_t R, int64_t K, T* __restrict__ gx) {
  const int64_t total = R * K, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / K, k = idx - row * K;
    A acc = 0;
    for (int32_t i = starts[row]; i < starts[row + 1]; ++i) acc += G[static_cast<int64_t>(perm[i]) * K + k];
    gx[idx] = static_cast<T>(acc);
  }
}

// grad_weight[e, m, k] = sum over the expert's grouped rows r of grad_out[r, m] * x[row(r), k].
// Grid (ceil(K/64), ceil(M/64), E), 256 threads; thread (tx, ty) owns m = m0 + 4ty + i,
// k = k0 + 4tx + j; 16 rows per step, loaded with consecutive columns per thread (coalesced).
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    grouped_dw_kernel(const T* __restrict__ go, const T* __restrict__ x, const int32_t* __restrict__ row_index,
                      int64_t x_rows, const int32_t* __restrict__ so, int64_t M, int64_t K, T* __restrict__ gw) {
  __shared__ A Gs[16][64 + 4];
  __shared__ A Xs[16][64 + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int e = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 64, k0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t lo = so[e], hi = so[e + 1];
  const int lr = tid >> 4, lc = (tid & 15) * 4;  // load mapping: row lr of the step, columns lc..lc+3
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;
  for (int64_t r0 = lo; r0 < hi; r0 += 16) {
    const int64_t gr = r0 + lr;
    const bool in = gr < hi;
    const int64_t src = in ? gemm_src_row(row_index, gr, x_rows) : -1;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t m = m0 + lc + q, k = k0 + lc + q;
      Gs[lr][lc + q] = in && m < M ? static_cast<A>(go[gr * M + m]) : A(0);
      Xs[lr][lc + q] = src >= 0 && k < K ? static_cast<A>(x[src * K + k]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Gs[rr][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Xs[rr][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
      if (k < K) gw[(static_cast<int64_t>(e) * M + m) * K + k] = static_cast<T>(acc[i][j]);
    }
  }
}

// grad_bias[e, m] = sum of grad_out[r, m] over the expert's rows, in order. Grid (ceil(M/256), E).
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    grouped_dbias_kernel(const T* __restrict__ go, const int32_t* __restrict__ so, int64_t M, T* __restrict__ gb) {
  const int e = blockIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= M) return;
  A acc = 0;
  for (int64_t r = so[e]; r < so[e + 1]; ++r) acc += static_cast<A>(go[r * M + m]);
  gb[static_cast<int64_t>(e) * M + m] = static_cast<T>(acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_grouped_gemm_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index_in,
    const at::Tensor& offsets_in, const at::Tensor& weight_in, std::array<bool, 3> output_mask) {
  check_moe_grouped_gemm_backward(grad_out_in, x_in, row_index_in, offsets_in, weight_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), go = grad_out_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const bool has_ri = row_index_in.has_value() && row_index_in->defined();
  const at::Tensor ri = has_ri ? row_index_in->contiguous() : at::Tensor();
  const int64_t N = go.size(0), E = w.size(0), M = w.size(1), K = w.size(2), R = x.size(0);
  check_cuda_sizes(N, M, K, "moe_grouped_gemm_backward");
  TORCH_CHECK(M <= int64_t{65535} * 64 && E <= 65535, "moe_grouped_gemm_backward: M must be <= 65535*64 and E <= 65535 "
              "on CUDA, got M=", M, ", E=", E);
  const auto empty0 = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = output_mask[0] ? at::Tensor() : empty0();
  at::Tensor gw = output_mask[1] ? at::empty({E, M, K}, x.options()) : empty0();
  at::Tensor gb = output_mask[2] ? at::empty({E, M}, x.options()) : empty0();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_grouped_gemm_backward_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
    // dX rows in grouped order: out [N, K] = grad_out_e W_e (SIMT GEMM), in T or in A.
    const auto launch_dx = [&](auto* out) {
      using O = std::remove_pointer_t<decltype(out)>;
      const Schedule sched = make_schedule<O>(offsets, E, N, kSimtBM, out, K, stream);
      GemmParams<T, A> p;
      p.a = go.const_data_ptr<T>();
      p.a_rows = N;
      p.so = sched.so();
      p.tile_start = sched.tile_start();
      p.num_experts = static_cast<int>(E);
      p.n_rows = N;
      p.red = M;
      p.ncols = K;
      p.out = out;
      DenseBwdXB<T, A> b;
      b.w = w.const_data_ptr<T>();
      b.ncols = K;
      b.red = M;
      launch_gemm_simt<T, A, DenseBwdXB<T, A>, O>(p, b, false, stream);
    };
    if (output_mask[0]) {
      // Grouped rows owned by no expert (bad offsets) come out NaN, as in the forward.
      if (!has_ri) {
        gx = at::empty({R, K}, x.options());
        if (N > 0 && K > 0) launch_dx(gx.mutable_data_ptr<T>());
      } else if (N == 0 || K == 0 || R == 0) {
        gx = at::zeros({R, K}, x.options());
      } else {
        at::Tensor G = at::empty({N, K}, acc_opts);
        launch_dx(G.mutable_data_ptr<A>());
        // Inverse mapping: grouped rows sorted by x row (stable), then one ordered sum per x row.
        TORCH_CHECK(R < std::numeric_limits<int32_t>::max() - 1, "moe_grouped_gemm_backward: x must have < 2^31-2 rows "
                    "on CUDA, got ", R);
        at::Tensor perm = at::empty({N}, ri.options()), starts = at::empty({R + 1}, ri.options());
        counting_sort(ri.const_data_ptr<int32_t>(), N, std::max<int64_t>(R, 1), perm.mutable_data_ptr<int32_t>(), nullptr,
                      1, starts.mutable_data_ptr<int32_t>(), ri.options(), stream);
        gx = at::empty({R, K}, x.options());
        if (R > 0) {
          const unsigned blocks = static_cast<unsigned>(
              std::max<int64_t>(1, std::min<int64_t>(ceil_div(R * K, 256), sm_count() * 16)));
          segment_sum_kernel<T, A><<<blocks, 256, 0, stream>>>(G.const_data_ptr<A>(), perm.const_data_ptr<int32_t>(),
                                                              starts.const_data_ptr<int32_t>(), R, K,
                                                              gx.mutable_data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    }
    if (output_mask[1] || output_mask[2]) {
      const Schedule sched = make_schedule<T>(offsets, E, N, kSimtBM, static_cast<T*>(nullptr), 0, stream);
      if (output_mask[1] && gw.numel() > 0) {
        const dim3 grid(grid_x(ceil_div(K, 64), "moe_grouped_gemm_backward"), static_cast<unsigned>(ceil_div(M, 64)),
                        static_cast<unsigned>(E));
        grouped_dw_kernel<T, A><<<grid, 256, 0, stream>>>(go.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                                          has_ri ? ri.const_data_ptr<int32_t>() : nullptr, R, sched.so(),
                                                          M, K, gw.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[2] && gb.numel() > 0) {
        const dim3 grid(static_cast<unsigned>(ceil_div(M, 256)), static_cast<unsigned>(E));
        grouped_dbias_kernel<T, A><<<grid, 256, 0, stream>>>(go.const_data_ptr<T>(), sched.so(), M,
                                                             gb.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("moe_grouped_gemm", &moe_grouped_gemm);
  m.impl("moe_grouped_gemm_backward", &moe_grouped_gemm_backward);
}

}  // namespace gptoss::cuda
