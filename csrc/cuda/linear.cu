// Dense projection y = x W^T + b on CUDA: cuBLAS through at::linear (the contract is in
// registration.cpp; the CPU kernel, csrc/cpu/linear.cpp, has its own GEMV for decode shapes).
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace gptoss::cuda {
namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) { m.impl("linear", &linear); }

}  // namespace gptoss::cuda
