#pragma once
// RMSNorm element math (spec §2.1) shared by the CPU and CUDA kernels. F is float, double or a
// float vector type (at::vec::Vectorized<float>); all arithmetic is in F.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace gptoss {

// rstd = 1 / sqrt(sum_sq / d + eps) for one row of d elements whose squares sum to sum_sq.
// float: rsqrtf on the GPU, 1/sqrt on the CPU (they differ by at most ~2 ulp).
GPTOSS_HD float rms_norm_rstd(float sum_sq, int64_t d, float eps) {
  const float ms = sum_sq / static_cast<float>(d) + eps;
#if defined(__CUDA_ARCH__)
  return rsqrtf(ms);
#else
  return 1.f / std::sqrt(ms);
#endif
}
GPTOSS_HD double rms_norm_rstd(double sum_sq, int64_t d, double eps) {
  return 1.0 / std::sqrt(sum_sq / static_cast<double>(d) + eps);
}

// Forward output before the cast to x's dtype: (x * rstd) * w.
template <typename F>
GPTOSS_HD F rms_norm_out(F x, F rstd, F w) {
  return (x * rstd) * w;
}

// Gradient w.r.t. x: rstd * (g - xhat * mean(g * xhat)), with g = grad_out * w, xhat = x * rstd
// and mean_g_xhat the row mean of g * xhat. (grad w = sum over rows of grad_out * xhat.)
template <typename F>
GPTOSS_HD F rms_norm_grad_x(F g, F xhat, F rstd, F mean_g_xhat) {
  return rstd * (g - xhat * mean_g_xhat);
}

}  // namespace gptoss
