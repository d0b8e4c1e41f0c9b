// Argument checks, one function per op, shared by the CPU and CUDA kernels.
#include "ops.h"

#include "common/check.h"

namespace gptoss {

void check_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  check_float(x, "rms_norm", "x");
  check_float(scale, "rms_norm", "scale");
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must be [..., d] with at least 1 dim, got a 0-D tensor");
  TORCH_CHECK(x.size(-1) > 0, "rms_norm: x's last dim (d) must be > 0, got shape ", x.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(-1), "rms_norm: scale must have shape [",
              x.size(-1), "] (x's last dim), got ", scale.sizes());
  check_same_device(x, scale, "rms_norm", "x", "scale");
  check_finite(eps, "rms_norm", "eps");
  TORCH_CHECK(eps >= 0, "rms_norm: eps must be >= 0, got ", eps);
}

void check_rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& rstd) {
  check_rms_norm(x, scale, 0.0);
  check_float(grad_out, "rms_norm_backward", "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "rms_norm_backward: grad_out must have x's shape ",
              x.sizes(), ", got ", grad_out.sizes());
  check_same_dtype(x, grad_out, "rms_norm_backward", "x", "grad_out");
  check_same_device(x, grad_out, "rms_norm_backward", "x", "grad_out");
  check_defined(rstd, "rms_norm_backward", "rstd");
  TORCH_CHECK(rstd.scalar_type() == acc_dtype(x.scalar_type()), "rms_norm_backward: rstd must be ",
              acc_dtype(x.scalar_type()), ", got ", rstd.scalar_type());
  TORCH_CHECK(rstd.numel() == x.numel() / x.size(-1), "rms_norm_backward: rstd must have ",
              x.numel() / x.size(-1), " elements (one per row of x), got ", rstd.numel());
  check_same_device(x, rstd, "rms_norm_backward", "x", "rstd");
}

void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(x, "apply_rope", "x");
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "apply_rope: x must be [B, T, H, D] or [T, H, D], got shape ",
              x.sizes());
  const int64_t D = x.size(-1), T = x.size(-3);
  TORCH_CHECK(D > 0 && D % 2 == 0, "apply_rope: x's head dim D must be even and > 0, got ", D);
  const char* names[2] = {"cos", "sin"};
  const at::Tensor* tabs[2] = {&cos, &sin};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *tabs[i];
    check_dtype_in(t, "apply_rope", names[i], {at::kFloat, at::kDouble});
    check_same_device(x, t, "apply_rope", "x", names[i]);
    const bool per_batch = x.dim() == 4 && t.dim() == 3;
    TORCH_CHECK((t.dim() == 2 && t.size(0) == T && t.size(1) == D / 2) ||
                    (per_batch && t.size(0) == x.size(0) && t.size(1) == T && t.size(2) == D / 2),
                "apply_rope: ", names[i], " must be [T, D/2] = [", T, ", ", D / 2, "]",
                x.dim() == 4 ? " or [B, T, D/2]" : "", " for x of shape ", x.sizes(), ", got ",
                t.sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "apply_rope: sin must have cos's shape ", cos.sizes(),
              ", got ", sin.sizes());
}

}  // namespace gptoss
