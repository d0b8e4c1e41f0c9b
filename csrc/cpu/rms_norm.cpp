// RMSNorm on the CPU (spec §2.1): y = (x_f32 * rsqrt(mean(x_f32^2) + eps)) * scale_f32, cast to
// x's dtype, and add_rms_norm (the same of x + residual, the sum written too). Rows run in
// parallel; each row is two vectorised passes (sum of squares, scale).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "common/dispatch.h"
#include "common/rms_norm.h"
#include "common/vec.h"
#include "ops.h"

namespace gptoss::cpu {
namespace {

// Rows per parallel task: ~64K elements, so that decode-sized inputs (a few rows) run on the
// calling thread instead of paying a thread-team wake-up.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 65536 / d); }

// With res (add_rms_norm): the row is first s = x + res rounded to T, written to sum, and s is
// normalised (exactly rms_norm of torch's x + res). res and sum are null for rms_norm.
template <typename T>
void rms_norm_fwd(const T* x, const T* res, const float* w, T* y, T* sum, float* rstd, int64_t rows, int64_t d,
                  float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      T* yr = y + r * d;
      fVec acc(0.f);
      if (res != nullptr) {
        const T* rr = res + r * d;
        T* sr = sum + r * d;
        for_vec(d, [&](int64_t i, int64_t n) {
          // the sum rounded in registers (reading back a masked store would stall forwarding)
          const fVec v = round_f<T>(load_f(xr + i, n) + load_f(rr + i, n));
          store_f(sr + i, v, n);
          acc = at::vec::fmadd(v, v, acc);
        });
        xr = sr;
      } else {
        for_vec(d, [&](int64_t i, int64_t n) {
          fVec v = n == kVecSize ? load_f(xr + i) : load_f(xr + i, n);
          acc = at::vec::fmadd(v, v, acc);
        });
      }
      const float ss = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
      const float rs = rms_norm_rstd(ss, d, eps);
      rstd[r] = rs;
      const fVec vrs(rs);
      for_vec(d, [&](int64_t i, int64_t n) {
        if (n == kVecSize) {
          store_f(yr + i, rms_norm_out(load_f(xr + i), vrs, fVec::loadu(w + i)));
        } else {
          store_f(yr + i, rms_norm_out(load_f(xr + i, n), vrs, fVec::loadu(w + i, n)), n);
        }
      });
    }
  });
}

// grad_x = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd;
// grad_w = sum over rows of dy * xhat. Row chunks write their grad_w partials to their own row of
// `partial` (deterministic), summed at the end.
template <typename T>
void rms_norm_bwd(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* partial,
                  int64_t nchunks, int64_t rows, int64_t d) {
  const int64_t chunk = (rows + nchunks - 1) / nchunks;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* pw = partial + c * d;
      for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        T* dxr = dx + r * d;
        const fVec vrs(rstd[r]);
        fVec acc(0.f);
        for_vec(d, [&](int64_t i, int64_t n) {
          const bool full = n == kVecSize;
          fVec xh = (full ? load_f(xr + i) : load_f(xr + i, n)) * vrs;
          fVec g = full ? load_f(dyr + i) : load_f(dyr + i, n);
          fVec pwv = fVec::loadu(pw + i, n);
          at::vec::fmadd(g, xh, pwv).store(pw + i, n);
          acc = at::vec::fmadd(g * fVec::loadu(w + i, n), xh, acc);
        });
        const float mean_gx =
            at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc) / d;
        const fVec vm(mean_gx);
        for_vec(d, [&](int64_t i, int64_t n) {
          const bool full = n == kVecSize;
          fVec xh = (full ? load_f(xr + i) : load_f(xr + i, n)) * vrs;
          fVec g = (full ? load_f(dyr + i) : load_f(dyr + i, n)) * fVec::loadu(w + i, n);
          store_f(dxr + i, rms_norm_grad_x(g, xh, vrs, vm), n);
        });
      }
    }
  });
}

// float64 path (gradcheck): plain loops, same formulas (res and sum as rms_norm_fwd).
void rms_norm_fwd_f64(const double* x, const double* res, const double* w, double* y, double* sum, double* rstd,
                      int64_t rows, int64_t d, double eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* xr = x + r * d;
      if (res != nullptr) {
        for (int64_t i = 0; i < d; ++i) sum[r * d + i] = xr[i] + res[r * d + i];
        xr = sum + r * d;
      }
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
      const double rs = rms_norm_rstd(ss, d, eps);
      rstd[r] = rs;
      for (int64_t i = 0; i < d; ++i) y[r * d + i] = rms_norm_out(xr[i], rs, w[i]);
    }
  });
}

void rms_norm_bwd_f64(const double* dy, const double* x, const double* w, const double* rstd,
                      double* dx, double* gw, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    double acc = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double xh = x[r * d + i] * rstd[r];
      gw[i] += dy[r * d + i] * xh;
      acc += dy[r * d + i] * w[i] * xh;
    }
    const double m = acc / d;
    for (int64_t i = 0; i < d; ++i)
      dx[r * d + i] = rms_norm_grad_x(dy[r * d + i] * w[i], x[r * d + i] * rstd[r], rstd[r], m);
  }
}

// rms_norm (res undefined) and add_rms_norm: returns out, sum (undefined for rms_norm), rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x_in, const at::Tensor& res_in,
                                                            const at::Tensor& scale, double eps) {
  const at::Tensor x = x_in.contiguous();
  const bool add = res_in.defined();
  const at::Tensor res = add ? res_in.contiguous() : at::Tensor();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = scale.to(acc).contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor sum = add ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc));
  if (rows == 0) return {y, sum, rstd};
  if (x.scalar_type() == at::kDouble) {
    rms_norm_fwd_f64(x.const_data_ptr<double>(), add ? res.const_data_ptr<double>() : nullptr,
                     w.const_data_ptr<double>(), y.mutable_data_ptr<double>(),
                     add ? sum.mutable_data_ptr<double>() : nullptr, rstd.mutable_data_ptr<double>(), rows, d, eps);
    return {y, sum, rstd};
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm", [&] {
    rms_norm_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), add ? res.const_data_ptr<scalar_t>() : nullptr,
                           w.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(),
                           add ? sum.mutable_data_ptr<scalar_t>() : nullptr, rstd.mutable_data_ptr<float>(), rows, d,
                           static_cast<float>(eps));
  });
  return {y, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  check_rms_norm(x, scale, eps);
  auto [y, sum, rstd] = norm_forward(x, at::Tensor(), scale, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& scale, double eps) {
  check_add_rms_norm(x, residual, scale, eps);
  return norm_forward(x, residual, scale, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out,
                                                     const at::Tensor& x_in,
                                                     const at::Tensor& scale,
                                                     const at::Tensor& rstd_in) {
  check_rms_norm_backward(grad_out, x_in, scale, rstd_in);
  const at::Tensor x = x_in.contiguous(), dy = grad_out.contiguous(), rstd = rstd_in.contiguous();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = scale.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x);
  if (x.scalar_type() == at::kDouble) {
    at::Tensor gw = at::zeros({d}, x.options());
    rms_norm_bwd_f64(dy.const_data_ptr<double>(), x.const_data_ptr<double>(),
                     w.const_data_ptr<double>(), rstd.const_data_ptr<double>(),
                     dx.mutable_data_ptr<double>(), gw.mutable_data_ptr<double>(), rows, d);
    return {dx, gw.to(scale.scalar_type())};
  }
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  at::Tensor partial = at::zeros({nchunks, d}, x.options().dtype(at::kFloat));
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm_backward", [&] {
    rms_norm_bwd<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                           dx.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<float>(),
                           nchunks, rows, d);
  });
  return {dx, partial.sum(0).to(scale.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace gptoss::cpu
