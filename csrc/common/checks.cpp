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

namespace gptoss {
namespace {

void check_sinks(const c10::optional<at::Tensor>& sinks, const at::Tensor& q, const char* op) {
  if (!sinks.has_value() || !sinks->defined()) return;
  check_float(*sinks, op, "sinks");
  check_same_device(q, *sinks, op, "q", "sinks");
  TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == q.size(2), op, ": sinks must be [Hq] = [",
              q.size(2), "] (one logit per query head), got shape ", sinks->sizes());
}

void check_attn_scalars(double sm_scale, int64_t window, const char* op) {
  check_finite(sm_scale, op, "sm_scale");
  TORCH_CHECK(sm_scale > 0, op, ": sm_scale must be > 0, got ", sm_scale);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = full causal), got ", window);
}

// q [B, Tq, Hq, D] against k/v [B, Tk, Hkv, D] (Tk is the cache size S for the cache ops).
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
               const char* kname, const char* vname) {
  check_float(q, op, "q");
  check_dim(q, 4, op, "q", "[B, Tq, Hq, D]");
  check_dim(k, 4, op, kname, "[B, Tk, Hkv, D]");
  check_dim(v, 4, op, vname, "[B, Tk, Hkv, D]");
  check_same_dtype(q, k, op, "q", kname);
  check_same_dtype(q, v, op, "q", vname);
  check_same_device(q, k, op, "q", kname);
  check_same_device(q, v, op, "q", vname);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": ", vname, " must have ", kname, "'s shape ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": ", kname, " must have q's batch size ", q.size(0),
              ", got ", k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": ", kname, " must have q's head dim ", q.size(3), ", got ",
              k.size(3));
  TORCH_CHECK(q.size(3) > 0 && q.size(3) <= 128, op, ": head dim D must be in [1, 128], got ", q.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": q's heads (Hq = ", q.size(2),
              ") must be a positive multiple of ", kname, "'s heads (Hkv = ", k.size(2), ")");
}

}  // namespace

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& sinks, double sm_scale, int64_t window,
                     int64_t q_offset) {
  check_qkv(q, k, v, "attention", "k", "v");
  check_sinks(sinks, q, "attention");
  check_attn_scalars(sm_scale, window, "attention");
  TORCH_CHECK(q_offset >= 0, "attention: q_offset must be >= 0, got ", q_offset);
}

void check_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const c10::optional<at::Tensor>& sinks,
                              const at::Tensor& out, const at::Tensor& lse, double sm_scale,
                              int64_t window, int64_t q_offset) {
  check_attention(q, k, v, sinks, sm_scale, window, q_offset);
  const char* op = "attention_backward";
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ",
              out.sizes());
  check_same_dtype(q, grad_out, op, "q", "grad_out");
  check_same_dtype(q, out, op, "q", "out");
  check_same_device(q, grad_out, op, "q", "grad_out");
  check_same_device(q, out, op, "q", "out");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                  lse.size(2) == q.size(1),
              op, ": lse must be [B, Hq, Tq] = [", q.size(0), ", ", q.size(2), ", ", q.size(1), "], got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(q.scalar_type()), op, ": lse must be ",
              acc_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  check_same_device(q, lse, op, "q", "lse");
}

static void check_lengths(const at::Tensor& lengths, const at::Tensor& cache, const char* op) {
  check_defined(lengths, op, "lengths");
  TORCH_CHECK(lengths.scalar_type() == at::kInt, op, ": lengths must be int32, got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == cache.size(0), op, ": lengths must be [B] = [",
              cache.size(0), "], got shape ", lengths.sizes());
  check_same_device(cache, lengths, op, "k_cache", "lengths");
}

void check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& lengths, bool ring) {
  const char* op = "kv_cache_append";
  check_float(k_cache, op, "k_cache");
  check_dim(k_cache, 4, op, "k_cache", "[B, S, Hkv, D]");
  check_dim(k, 4, op, "k", "[B, Tn, Hkv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == k_cache.size(0) && k.size(2) == k_cache.size(2) && k.size(3) == k_cache.size(3),
              op, ": k must be [B, Tn, Hkv, D] matching k_cache ", k_cache.sizes(), " in B, Hkv and D, got ",
              k.sizes());
  const at::Tensor* ts[3] = {&v_cache, &k, &v};
  const char* names[3] = {"v_cache", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    check_same_dtype(k_cache, *ts[i], op, "k_cache", names[i]);
    check_same_device(k_cache, *ts[i], op, "k_cache", names[i]);
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
              ": k_cache and v_cache must be contiguous (they are written in place)");
  TORCH_CHECK(!ring || k.size(1) <= k_cache.size(1), op, ": a ring cache of ", k_cache.size(1),
              " slots cannot take ", k.size(1), " tokens at once");
  check_lengths(lengths, k_cache, op);
}

void check_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, const c10::optional<at::Tensor>& sinks,
                            double sm_scale, int64_t window, bool ring) {
  const char* op = "attention_decode";
  check_qkv(q, k_cache, v_cache, op, "k_cache", "v_cache");
  check_sinks(sinks, q, op);
  check_attn_scalars(sm_scale, window, op);
  check_lengths(lengths, k_cache, op);
  TORCH_CHECK(!ring || (window > 0 && k_cache.size(1) >= window + q.size(1) - 1), op,
              ": a ring cache needs window > 0 and S >= window + Tq - 1 (= ", window + q.size(1) - 1,
              ") slots, got window ", window, " and S = ", k_cache.size(1));
}

}  // namespace gptoss
