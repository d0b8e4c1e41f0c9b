#pragma once
// Declarations shared by the CPU and CUDA backends: the argument checks every op runs once
// (implemented in common/checks.cpp) and small shape helpers. The op schemas are in
// registration.cpp; each backend's kernels register themselves with TORCH_LIBRARY_IMPL.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace gptoss {

// rms_norm(x [..., d] float, scale [d] float, eps finite >= 0)
void check_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps);
// rms_norm_backward(grad_out like x, x, scale [d], rstd x.shape[:-1] float32/float64)
void check_rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& rstd);
// apply_rope(x [B, T, H, D] or [T, H, D] float, cos/sin [T, D/2] or [B, T, D/2] float32/64)
void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// attention(q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], sinks [Hq] or undefined, sm_scale > 0 finite,
// window >= 0, q_offset >= 0)
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& sinks, double sm_scale, int64_t window,
                     int64_t q_offset);
// attention_backward: the forward's checks plus grad_out/out like q, lse [B, Hq, Tq]
void check_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const c10::optional<at::Tensor>& sinks,
                              const at::Tensor& out, const at::Tensor& lse, double sm_scale,
                              int64_t window, int64_t q_offset);
// kv_cache_append(k_cache/v_cache [B,S,Hkv,D], k/v [B,Tn,Hkv,D] same dtype, lengths [B] int32).
// Value checks on lengths (>= 0, no overflow) need host data: the CPU kernel does them, the CUDA
// path relies on the Python cache object (which keeps host-side lengths) and never writes out of
// bounds.
void check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& lengths, bool ring);
// attention_decode(q [B,Tq,Hq,D], caches [B,S,Hkv,D], lengths [B] int32, sinks, ...)
void check_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, const c10::optional<at::Tensor>& sinks,
                            double sm_scale, int64_t window, bool ring);

// Accumulation dtype of a float dtype: float64 for float64, else float32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gptoss
