// MXFP4 codec on CUDA (spec §3.2): mxfp4_dequantize and mxfp4_quantize, the exact rules of
// gptoss_ext.reference (contracts in registration.cpp).
//
// Dequantize: one thread per byte (two elements), values assembled from integer bits
// (mxfp4_float_bits / mxfp4_double), so -ftz cannot flush the subnormal results of scale bytes 0
// and 1; bfloat16 takes the float's top half (exact: every value has <= 2 significant bits), half
// rounds the exact float once.
// Quantize: one thread per 32-element block, decisions made in float64 on the exactly converted
// input (the same decisions as the reference's float32 arithmetic, which is exact there). The
// float -> double conversion goes through the bits for subnormal floats: under --use_fast_math
// (-ftz=true) cvt.f64.f32 flushes a subnormal input to 0. A block with a non-finite element cannot raise on the device (the CPU kernel
// raises): it gets scale byte 255, which no finite block produces, and its elements are encoded
// at scale 2^127 (inf saturates to +-6, NaN becomes +0).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/moe_common.cuh"
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

template <typename T>
__device__ __forceinline__ T mxfp4_to(uint32_t nibble, uint32_t scale) {
  if constexpr (std::is_same_v<T, double>) {
    return mxfp4_double(nibble, scale);
  } else if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(mxfp4_float_bits(nibble, scale));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(static_cast<uint16_t>(mxfp4_float_bits(nibble, scale) >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(__uint_as_float(mxfp4_float_bits(nibble, scale)));
  }
}

// out[2i], out[2i+1] from byte i of blocks (low nibble first) and scale byte i / 16.
template <typename T>
__global__ void __launch_bounds__(256)
    mxfp4_dequant_kernel(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales, int64_t n_bytes,
                         T* __restrict__ out) {
  using V = Vec<T, 2>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
    const uint32_t b = blocks[i], s = scales[i >> 4];
    V v;
    v.v[0] = mxfp4_to<T>(b & 15u, s);
    v.v[1] = mxfp4_to<T>(b >> 4, s);
    reinterpret_cast<V*>(out)[i] = v;
  }
}

// E2M1 nibble of y (already divided by the block scale): nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6},
// ties to the even magnitude index, saturating at 6, +0 for anything that rounds to 0 (and NaN).
__device__ __forceinline__ uint32_t e2m1_nibble(double y) {
  const double m = fabs(y);
  const uint32_t idx = static_cast<uint32_t>(m > 0.25) + static_cast<uint32_t>(m >= 0.75) +
                       static_cast<uint32_t>(m > 1.25) + static_cast<uint32_t>(m >= 1.75) +
                       static_cast<uint32_t>(m > 2.5) + static_cast<uint32_t>(m >= 3.5) +
                       static_cast<uint32_t>(m > 5.0);
  return idx + ((y < 0 && idx > 0) ? 8u : 0u);
}

// x as a double, exactly, also for a subnormal float (which cvt.ftz.f64.f32 would flush to 0).
__device__ __forceinline__ double exact_double(float x) {
  const uint32_t b = __float_as_uint(x);
  if ((b & 0x7f800000u) != 0) return static_cast<double>(x);  // normal, inf, NaN: not flushed
  const double mag = static_cast<double>(b & 0x7fffffu) * 0x1p-149;  // 0 or subnormal: mantissa * 2^-149
  return (b >> 31) ? -mag : mag;
}

template <typename T>
__device__ __forceinline__ double block_value(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return exact_double(static_cast<float>(v));  // bf16 -> float and half -> float are exact
  }
}

// One thread per block of 32 elements: w [n_blocks, 32] -> blocks [n_blocks, 16], scales [n_blocks].
template <typename T>
__global__ void __launch_bounds__(256)
    mxfp4_quant_kernel(const T* __restrict__ w, int64_t n_blocks, uint8_t* __restrict__ blocks,
                       uint8_t* __restrict__ scales) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t bi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; bi < n_blocks; bi += stride) {
    const T* src = w + bi * 32;
    double amax = 0;
    bool finite = true;
    for (int j = 0; j < 32; ++j) {
      const double v = block_value(src[j]);
      finite = finite && isfinite(v);
      amax = fmax(amax, fabs(v));
    }
    int e = 0;
    if (!finite) {
      e = 127;
    } else if (amax > 0) {
      // amax = m * 2^ex, m in [0.5, 1): the smallest e with amax <= 6 * 2^e = 0.75 * 2^(e+3).
      int ex = 0;
      const double m = frexp(amax, &ex);
      e = m <= 0.75 ? ex - 3 : ex - 2;
      e = min(max(e, -127), 127);
    }
    const double inv = ldexp(1.0, -e);
    uint32_t words[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) word |= e2m1_nibble(block_value(src[8 * q + j]) * inv) << (4 * j);
      words[q] = word;
    }
    reinterpret_cast<uint4*>(blocks)[bi] = make_uint4(words[0], words[1], words[2], words[3]);
    scales[bi] = static_cast<uint8_t>(finite ? e + 127 : 255);
  }
}

unsigned codec_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), sm_count() * 16)));
}

at::Tensor mxfp4_dequantize(const at::Tensor& blocks_in, const at::Tensor& scales_in, c10::ScalarType dtype) {
  check_mxfp4_dequantize(blocks_in, scales_in, dtype);
  const c10::cuda::CUDAGuard guard(blocks_in.device());
  const at::Tensor blocks = blocks_in.contiguous(), scales = scales_in.contiguous();
  auto shape = scales.sizes().vec();
  shape.back() *= 32;
  at::Tensor out = at::empty(shape, blocks.options().dtype(dtype));
  const int64_t n_bytes = blocks.numel();
  if (n_bytes == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mxfp4_dequantize_cuda", [&] {
    mxfp4_dequant_kernel<scalar_t><<<codec_blocks(n_bytes), 256, 0, stream>>>(
        blocks.const_data_ptr<uint8_t>(), scales.const_data_ptr<uint8_t>(), n_bytes, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize(const at::Tensor& w_in) {
  check_mxfp4_quantize(w_in);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  auto bshape = w.sizes().vec();
  bshape.back() /= 32;
  auto sshape = bshape;
  bshape.push_back(16);
  at::Tensor blocks = at::empty(bshape, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty(sshape, w.options().dtype(at::kByte));
  const int64_t n_blocks = scales.numel();
  if (n_blocks == 0) return {blocks, scales};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "mxfp4_quantize_cuda", [&] {
    mxfp4_quant_kernel<scalar_t><<<codec_blocks(n_blocks), 256, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), n_blocks, blocks.mutable_data_ptr<uint8_t>(), scales.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {blocks, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("mxfp4_dequantize", &mxfp4_dequantize);
  m.impl("mxfp4_quantize", &mxfp4_quantize);
}

}  // namespace gptoss::cuda
