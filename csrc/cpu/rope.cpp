// Half-split RoPE on the CPU (spec §2.3). x [B, T, H, D] or [T, H, D]; cos/sin [T, D/2] or
// [B, T, D/2] float32. Math in float32 (float64 for float64 x), output in x's dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/rope.h"
#include "common/vec.h"
#include "ops.h"

namespace gptoss::cpu {
namespace {

// tab_stride: elements between consecutive (b, t) rows of cos/sin: D/2, with tab_batch_stride 0
// when the table is shared by the batch.
template <typename T>
void rope_fwd(const T* x, const float* cos, const float* sin, T* y, int64_t B, int64_t Tn, int64_t H,
              int64_t D, int64_t tab_batch_stride) {
  const int64_t half = D / 2;
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 65536 / (H * D)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Tn, t = p % Tn;
      const float* c = cos + b * tab_batch_stride + t * half;
      const float* s = sin + b * tab_batch_stride + t * half;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = x + (p * H + h) * D;
        T* yr = y + (p * H + h) * D;
        for_vec(half, [&](int64_t i, int64_t n) {
          fVec x1 = load_f(xr + i, n), x2 = load_f(xr + half + i, n);
          fVec vc = fVec::loadu(c + i, n), vs = fVec::loadu(s + i, n);
          fVec o1, o2;
          rope_rotate(x1, x2, vc, vs, o1, o2);
          store_f(yr + i, o1, n);
          store_f(yr + half + i, o2, n);
        });
      }
    }
  });
}

void rope_fwd_f64(const double* x, const double* cos, const double* sin, double* y, int64_t B,
                  int64_t Tn, int64_t H, int64_t D, int64_t tab_batch_stride) {
  const int64_t half = D / 2;
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 65536 / (H * D)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const double* c = cos + (p / Tn) * tab_batch_stride + (p % Tn) * half;
      const double* s = sin + (p / Tn) * tab_batch_stride + (p % Tn) * half;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double* xr = x + (p * H + h) * D;
          double* yr = y + (p * H + h) * D;
          rope_rotate(xr[i], xr[half + i], c[i], s[i], yr[i], yr[half + i]);
        }
    }
  });
}

at::Tensor apply_rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_apply_rope(x_in, cos_in, sin_in);
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor cos = cos_in.to(acc).contiguous(), sin = sin_in.to(acc).contiguous();
  const bool batched = x.dim() == 4;
  const int64_t B = batched ? x.size(0) : 1, Tn = x.size(-3), H = x.size(-2), D = x.size(-1);
  const int64_t tab_batch_stride = cos.dim() == 3 ? Tn * (D / 2) : 0;
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  if (x.scalar_type() == at::kDouble) {
    rope_fwd_f64(x.const_data_ptr<double>(), cos.const_data_ptr<double>(), sin.const_data_ptr<double>(),
                 y.mutable_data_ptr<double>(), B, Tn, H, D, tab_batch_stride);
    return y;
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "apply_rope", [&] {
    rope_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(),
                       sin.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(), B, Tn, H, D,
                       tab_batch_stride);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) { m.impl("apply_rope", &apply_rope); }

}  // namespace gptoss::cpu
