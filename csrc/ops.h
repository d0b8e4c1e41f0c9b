#pragma once
// Declarations shared by the CPU and CUDA backends: the argument checks every op runs once
// (implemented in common/checks.cpp) and small shape helpers. The op schemas are in
// registration.cpp; each backend's kernels register themselves with TORCH_LIBRARY_IMPL.
#include <ATen/core/Tensor.h>

namespace gptoss {

// rms_norm(x [..., d] float, scale [d] float, eps finite >= 0)
void check_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps);
// rms_norm_backward(grad_out like x, x, scale [d], rstd x.shape[:-1] float32/float64)
void check_rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& rstd);
// apply_rope(x [B, T, H, D] or [T, H, D] float, cos/sin [T, D/2] or [B, T, D/2] float32/64)
void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// Accumulation dtype of a float dtype: float64 for float64, else float32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gptoss
