// Argument checks, one function per op, shared by the CPU and CUDA kernels.
#include "ops.h"

#include "common/check.h"

namespace gptoss {

namespace {
void check_norm_args(const at::Tensor& x, const at::Tensor& scale, double eps, const char* op) {
  check_float(x, op, "x");
  check_float(scale, op, "scale");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d] with at least 1 dim, got a 0-D tensor");
  TORCH_CHECK(x.size(-1) > 0, op, ": x's last dim (d) must be > 0, got shape ", x.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(-1), op, ": scale must have shape [", x.size(-1),
              "] (x's last dim), got ", scale.sizes());
  check_same_device(x, scale, op, "x", "scale");
  check_finite(eps, op, "eps");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}
}  // namespace

void check_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  check_norm_args(x, scale, eps, "rms_norm");
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps) {
  check_norm_args(x, scale, eps, "add_rms_norm");
  check_float(residual, "add_rms_norm", "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm: residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  check_same_dtype(x, residual, "add_rms_norm", "x", "residual");
  check_same_device(x, residual, "add_rms_norm", "x", "residual");
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

// ---------------------------------------------------------------------- Mixture of experts
namespace gptoss {
namespace {

void check_int32(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

void check_uint8(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kByte, op, ": ", name, " must be uint8, got ", t.scalar_type());
}

void check_limits(double alpha, double limit, const char* op) {
  check_finite(alpha, op, "alpha");
  TORCH_CHECK(limit > 0, op, ": limit must be > 0 (+inf disables the clamp), got ", limit);
}

// The grouping shared by the dense and MXFP4 GEMMs: x [R, K], row_index [N] or None, offsets [E+1].
// Returns N.
int64_t check_grouping(const at::Tensor& x, const c10::optional<at::Tensor>& row_index,
                       const at::Tensor& offsets, int64_t num_experts, const char* op) {
  check_dim(x, 2, op, "x", "[R, K]");
  int64_t n = x.size(0);
  if (row_index.has_value() && row_index->defined()) {
    check_int32(*row_index, op, "row_index");
    check_dim(*row_index, 1, op, "row_index", "[N]");
    check_same_device(x, *row_index, op, "x", "row_index");
    n = row_index->size(0);
  }
  check_int32(offsets, op, "offsets");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == num_experts + 1, op, ": offsets must be [E+1] = [",
              num_experts + 1, "] (E from the expert weights), got shape ", offsets.sizes());
  check_same_device(x, offsets, op, "x", "offsets");
  return n;
}

void check_gemm_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t e, int64_t m,
                     const char* op) {
  if (!bias.has_value() || !bias->defined()) return;
  check_same_dtype(x, *bias, op, "x", "bias");
  check_same_device(x, *bias, op, "x", "bias");
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == e && bias->size(1) == m, op, ": bias must be [E, M] = [",
              e, ", ", m, "], got shape ", bias->sizes());
}

}  // namespace

void check_moe_route(const at::Tensor& router_logits, int64_t k) {
  const char* op = "moe_route";
  check_float(router_logits, op, "router_logits");
  check_dim(router_logits, 2, op, "router_logits", "[T, E]");
  const int64_t e = router_logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, op, ": k must be in [1, E] = [1, ", e, "] (E = router_logits.size(1)), got ", k);
}

void check_moe_route_backward(const at::Tensor& grad_weights, const at::Tensor& weights,
                              const at::Tensor& experts, int64_t num_experts) {
  const char* op = "moe_route_backward";
  check_dtype_in(weights, op, "weights", {at::kFloat, at::kDouble});
  check_dim(weights, 2, op, "weights", "[T, k]");
  check_float(grad_weights, op, "grad_weights");
  TORCH_CHECK(grad_weights.sizes() == weights.sizes(), op, ": grad_weights must have weights' shape ",
              weights.sizes(), ", got ", grad_weights.sizes());
  check_int32(experts, op, "experts");
  TORCH_CHECK(experts.sizes() == weights.sizes(), op, ": experts must have weights' shape ", weights.sizes(),
              ", got ", experts.sizes());
  TORCH_CHECK(num_experts >= weights.size(1), op, ": num_experts must be >= k = ", weights.size(1), ", got ",
              num_experts);
  check_same_device(weights, grad_weights, op, "weights", "grad_weights");
  check_same_device(weights, experts, op, "weights", "experts");
}

void check_moe_dispatch(const at::Tensor& experts, int64_t num_experts) {
  const char* op = "moe_dispatch";
  check_int32(experts, op, "experts");
  check_dim(experts, 2, op, "experts", "[T, k]");
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(experts.size(1) >= 1, op, ": experts must have k >= 1 columns, got shape ", experts.sizes());
  TORCH_CHECK(experts.numel() < (int64_t{1} << 31), op, ": experts has ", experts.numel(),
              " entries; int32 indices allow < 2^31");
}

void check_swiglu(const at::Tensor& h, double alpha, double limit) {
  const char* op = "swiglu";
  check_float(h, op, "h");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, op,
              ": h must be [..., 2I] with an even last dim (interleaved glu/linear pairs), got shape ", h.sizes());
  check_limits(alpha, limit, op);
}

void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& h, double alpha, double limit) {
  const char* op = "swiglu_backward";
  check_float(h, op, "h");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, op, ": h must be [..., 2I] with an even last dim, got shape ",
              h.sizes());
  check_float(grad_out, op, "grad_out");
  check_same_dtype(h, grad_out, op, "h", "grad_out");
  check_same_device(h, grad_out, op, "h", "grad_out");
  auto expected = h.sizes().vec();
  expected.back() /= 2;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), op, ": grad_out must be [..., I] = ",
              at::IntArrayRef(expected), ", got ", grad_out.sizes());
  check_limits(alpha, limit, op);
}

int64_t check_moe_grouped_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& row_index,
                               const at::Tensor& offsets, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, bool fused_swiglu, double alpha,
                               double limit) {
  const char* op = "moe_grouped_gemm";
  check_float(x, op, "x");
  check_dim(weight, 3, op, "weight", "[E, M, K]");
  check_same_dtype(x, weight, op, "x", "weight");
  check_same_device(x, weight, op, "x", "weight");
  const int64_t n = check_grouping(x, row_index, offsets, weight.size(0), op);
  TORCH_CHECK(weight.size(2) == x.size(1), op, ": weight must be [E, M, K] with K = x.size(1) = ", x.size(1),
              ", got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, op, ": weight must hold at least one expert, got shape ", weight.sizes());
  check_gemm_bias(bias, x, weight.size(0), weight.size(1), op);
  if (fused_swiglu) {
    TORCH_CHECK(weight.size(1) % 2 == 0, op, ": fused_swiglu needs an even M (interleaved pairs), got weight ",
                weight.sizes());
    check_limits(alpha, limit, op);
  }
  return n;
}

void check_moe_grouped_gemm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& row_index,
                                     const at::Tensor& offsets, const at::Tensor& weight) {
  const char* op = "moe_grouped_gemm_backward";
  const int64_t n = check_moe_grouped_gemm(x, row_index, offsets, weight, c10::nullopt, false, 0.0, 1.0);
  check_float(grad_out, op, "grad_out");
  check_same_dtype(x, grad_out, op, "x", "grad_out");
  check_same_device(x, grad_out, op, "x", "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == weight.size(1), op,
              ": grad_out must be [N, M] = [", n, ", ", weight.size(1), "], got shape ", grad_out.sizes());
}

int64_t check_moe_grouped_gemm_mxfp4(const at::Tensor& x, const c10::optional<at::Tensor>& row_index,
                                     const at::Tensor& offsets, const at::Tensor& blocks,
                                     const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                     bool fused_swiglu, double alpha, double limit) {
  const char* op = "moe_grouped_gemm_mxfp4";
  check_dtype_in(x, op, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_uint8(blocks, op, "blocks");
  check_uint8(scales, op, "scales");
  check_dim(blocks, 4, op, "blocks", "[E, M, K/32, 16]");
  check_dim(scales, 3, op, "scales", "[E, M, K/32]");
  check_same_device(x, blocks, op, "x", "blocks");
  check_same_device(x, scales, op, "x", "scales");
  const int64_t n = check_grouping(x, row_index, offsets, blocks.size(0), op);
  TORCH_CHECK(x.size(1) % 32 == 0, op, ": x's reduction dim K = ", x.size(1),
              " must be a multiple of 32 (the MXFP4 block size)");
  TORCH_CHECK(blocks.size(3) == 16 && blocks.size(2) * 32 == x.size(1), op,
              ": blocks must be [E, M, K/32, 16] with K/32 = ", x.size(1) / 32, ", got shape ", blocks.sizes());
  TORCH_CHECK(scales.size(0) == blocks.size(0) && scales.size(1) == blocks.size(1) &&
                  scales.size(2) == blocks.size(2),
              op, ": scales must be [E, M, K/32] = ", blocks.sizes().slice(0, 3), " (blocks' leading dims), got ",
              scales.sizes());
  TORCH_CHECK(blocks.size(0) >= 1, op, ": blocks must hold at least one expert, got shape ", blocks.sizes());
  check_gemm_bias(bias, x, blocks.size(0), blocks.size(1), op);
  if (fused_swiglu) {
    TORCH_CHECK(blocks.size(1) % 2 == 0, op, ": fused_swiglu needs an even M (interleaved pairs), got blocks ",
                blocks.sizes());
    check_limits(alpha, limit, op);
  }
  return n;
}

void check_grouping_values(const at::Tensor& offsets, const c10::optional<at::Tensor>& row_index,
                           int64_t n_rows, int64_t x_rows, const char* op) {
  const at::Tensor off = offsets.contiguous();
  const int32_t* o = off.const_data_ptr<int32_t>();
  const int64_t e = off.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[e] == n_rows, op, ": offsets must run from 0 to N = ", n_rows,
              " (the grouped row count), got offsets[0] = ", o[0], " and offsets[E] = ", o[e]);
  for (int64_t i = 0; i < e; ++i)
    TORCH_CHECK(o[i] <= o[i + 1], op, ": offsets must be nondecreasing, got offsets[", i, "] = ", o[i],
                " > offsets[", i + 1, "] = ", o[i + 1]);
  if (row_index.has_value() && row_index->defined()) {
    const at::Tensor ri = row_index->contiguous();
    const int32_t* p = ri.const_data_ptr<int32_t>();
    for (int64_t r = 0; r < ri.numel(); ++r)
      TORCH_CHECK(p[r] >= 0 && p[r] < x_rows, op, ": row_index values must be in [0, R) = [0, ", x_rows,
                  ") (R = x.size(0)), got row_index[", r, "] = ", p[r]);
  }
}

void check_moe_experts_mxfp4(const at::Tensor& x, const at::Tensor& router_logits, int64_t k,
                             const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales,
                             const at::Tensor& mlp1_bias, const at::Tensor& mlp2_blocks,
                             const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias, double alpha,
                             double limit) {
  const char* op = "moe_experts_mxfp4";
  check_dtype_in(x, op, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dim(x, 2, op, "x", "[T, d]");
  const int64_t t = x.size(0), d = x.size(1);
  TORCH_CHECK(d % 32 == 0 && d > 0, op, ": x's hidden dim d = ", d,
              " must be a positive multiple of 32 (the MXFP4 block size)");
  check_defined(router_logits, op, "router_logits");
  check_same_dtype(x, router_logits, op, "x", "router_logits");
  check_same_device(x, router_logits, op, "x", "router_logits");
  TORCH_CHECK(router_logits.dim() == 2 && router_logits.size(0) == t && router_logits.size(1) >= 1, op,
              ": router_logits must be [T, E] with T = ", t, " (x's rows), got shape ", router_logits.sizes());
  const int64_t e = router_logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, op, ": k must be in [1, E] = [1, ", e, "] (E = router_logits.size(1)), got ", k);
  struct W {
    const at::Tensor& blocks;
    const at::Tensor& scales;
    const at::Tensor& bias;
    const char *bn, *sn, *biasn, *layout;
  };
  const W ws[2] = {
      {mlp1_blocks, mlp1_scales, mlp1_bias, "mlp1_blocks", "mlp1_scales", "mlp1_bias", "[E, 2I, d/32, 16]"},
      {mlp2_blocks, mlp2_scales, mlp2_bias, "mlp2_blocks", "mlp2_scales", "mlp2_bias", "[E, d, I/32, 16]"}};
  for (const W& w : ws) {
    check_uint8(w.blocks, op, w.bn);
    check_uint8(w.scales, op, w.sn);
    check_dim(w.blocks, 4, op, w.bn, w.layout);
    check_same_device(x, w.blocks, op, "x", w.bn);
    check_same_device(x, w.scales, op, "x", w.sn);
    TORCH_CHECK(w.blocks.size(0) == e && w.blocks.size(3) == 16, op, ": ", w.bn, " must be ", w.layout,
                " with E = ", e, " (router_logits.size(1)), got shape ", w.blocks.sizes());
    TORCH_CHECK(w.scales.dim() == 3 && w.scales.sizes() == w.blocks.sizes().slice(0, 3), op, ": ", w.sn,
                " must be ", w.blocks.sizes().slice(0, 3), " (", w.bn, "' leading dims), got shape ", w.scales.sizes());
    check_defined(w.bias, op, w.biasn);
    check_same_dtype(x, w.bias, op, "x", w.biasn);
    check_same_device(x, w.bias, op, "x", w.biasn);
    TORCH_CHECK(w.bias.dim() == 2 && w.bias.size(0) == e && w.bias.size(1) == w.blocks.size(1), op, ": ",
                w.biasn, " must be [E, ", w.blocks.size(1), "] (", w.bn, "' first two dims), got shape ",
                w.bias.sizes());
  }
  const int64_t two_i = mlp1_blocks.size(1);
  TORCH_CHECK(mlp1_blocks.size(2) * 32 == d, op, ": mlp1_blocks must be [E, 2I, d/32, 16] with d/32 = ", d / 32,
              ", got shape ", mlp1_blocks.sizes());
  TORCH_CHECK(two_i % 64 == 0 && two_i > 0, op, ": mlp1_blocks' 2I = ", two_i,
              " must be a positive multiple of 64 (I is mlp2's reduction dim, a multiple of 32)");
  TORCH_CHECK(mlp2_blocks.size(1) == d && mlp2_blocks.size(2) * 32 == two_i / 2, op,
              ": mlp2_blocks must be [E, d, I/32, 16] = [", e, ", ", d, ", ", two_i / 64, ", 16], got shape ",
              mlp2_blocks.sizes());
  check_limits(alpha, limit, op);
}

void check_moe_combine(const at::Tensor& y, const at::Tensor& order, const at::Tensor& weights) {
  const char* op = "moe_combine";
  check_float(y, op, "y");
  check_dim(y, 2, op, "y", "[N, d]");
  check_int32(order, op, "order");
  TORCH_CHECK(order.dim() == 1 && order.size(0) == y.size(0), op, ": order must be [N] = [", y.size(0),
              "] (y's rows), got shape ", order.sizes());
  check_float(weights, op, "weights");
  check_dim(weights, 2, op, "weights", "[T, k]");
  TORCH_CHECK(weights.size(1) >= 1 && weights.size(0) * weights.size(1) == y.size(0), op,
              ": weights must be [T, k] with T*k = N = ", y.size(0), " (y's rows), got shape ", weights.sizes());
  check_same_device(y, order, op, "y", "order");
  check_same_device(y, weights, op, "y", "weights");
}

void check_moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& order,
                                const at::Tensor& weights) {
  check_moe_combine(y, order, weights);
  const char* op = "moe_combine_backward";
  check_float(grad_out, op, "grad_out");
  check_same_dtype(y, grad_out, op, "y", "grad_out");
  check_same_device(y, grad_out, op, "y", "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == weights.size(0) && grad_out.size(1) == y.size(1), op,
              ": grad_out must be [T, d] = [", weights.size(0), ", ", y.size(1), "], got shape ", grad_out.sizes());
}

void check_mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales, c10::ScalarType dtype) {
  const char* op = "mxfp4_dequantize";
  check_uint8(blocks, op, "blocks");
  check_uint8(scales, op, "scales");
  TORCH_CHECK(blocks.dim() >= 2 && blocks.size(-1) == 16, op, ": blocks must be [..., G, 16], got shape ",
              blocks.sizes());
  TORCH_CHECK(scales.sizes() == blocks.sizes().slice(0, blocks.dim() - 1), op, ": scales must be [..., G] = ",
              blocks.sizes().slice(0, blocks.dim() - 1), " (blocks' shape without the last dim), got ",
              scales.sizes());
  check_same_device(blocks, scales, op, "blocks", "scales");
  TORCH_CHECK(is_float_dtype(dtype), op, ": dtype must be float32, bfloat16, float16 or float64, got ", dtype);
}

void check_mxfp4_quantize(const at::Tensor& w) {
  const char* op = "mxfp4_quantize";
  check_float(w, op, "w");
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % 32 == 0, op,
              ": w's last dim must be a multiple of 32 (the MXFP4 block size), got shape ", w.sizes());
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_float(x, "linear", "x");
  check_defined(weight, "linear", "weight");
  TORCH_CHECK(x.dim() >= 1, "linear: x must be [..., K] with at least 1 dim, got a 0-D tensor");
  check_dim(weight, 2, "linear", "weight", "[N, K]");
  TORCH_CHECK(weight.size(1) == x.size(-1), "linear: weight must be [N, K] with K = x's last dim (", x.size(-1),
              "), got shape ", weight.sizes());
  check_same_dtype(x, weight, "linear", "x", "weight");
  check_same_device(x, weight, "linear", "x", "weight");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias must be [N] = [", weight.size(0),
                "] (weight's rows), got shape ", bias->sizes());
    check_same_dtype(x, *bias, "linear", "x", "bias");
    check_same_device(x, *bias, "linear", "x", "bias");
  }
}

}  // namespace gptoss
