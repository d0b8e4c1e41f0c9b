#pragma once
// Argument checks shared by every op. Each message names the op and the argument and says what
// was expected, e.g. "rms_norm: scale must have shape [2880] (x's last dim), got [2048]".
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <string>

namespace gptoss {

inline bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_dtype_in(const at::Tensor& t, const char* op, const char* name,
                           std::initializer_list<c10::ScalarType> allowed) {
  check_defined(t, op, name);
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  std::string list;
  for (auto a : allowed) list += std::string(list.empty() ? "" : "/") + c10::toString(a);
  TORCH_CHECK(false, op, ": ", name, " must be ", list, ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_b, " must have the dtype of ",
              name_a, " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_b, " must be on ", name_a, "'s device (",
              a.device(), "), got ", b.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", layout, " (", dim, "-D), got shape ",
              t.sizes());
}

inline void check_finite(double v, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

}  // namespace gptoss
