#pragma once
// Declarations shared by the CPU and CUDA backends: the argument checks every op runs once
// (implemented in common/checks.cpp) and small shape helpers. The op schemas are in
// registration.cpp; each backend's kernels register themselves with TORCH_LIBRARY_IMPL.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace gptoss {

// rms_norm(x [..., d] float, scale [d] float, eps finite >= 0)
void check_rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps);
// add_rms_norm(x, residual like x (shape, dtype, device), scale, eps): rms_norm's checks plus those
void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps);
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

// ---- Mixture of experts (schemas and contracts in registration.cpp).
// moe_route(router_logits [T, E] float, 1 <= k <= E)
void check_moe_route(const at::Tensor& router_logits, int64_t k);
// moe_route_backward(grad_weights like weights, weights [T, k] float32/float64,
// experts [T, k] int32, num_experts >= k)
void check_moe_route_backward(const at::Tensor& grad_weights, const at::Tensor& weights,
                              const at::Tensor& experts, int64_t num_experts);
// moe_dispatch(experts [T, k] int32, num_experts >= 1). The id range needs the data: kernels
// check it.
void check_moe_dispatch(const at::Tensor& experts, int64_t num_experts);
// swiglu(h [..., 2I] float, alpha finite, limit > 0 or +inf)
void check_swiglu(const at::Tensor& h, double alpha, double limit);
// swiglu_backward(grad_out [..., I] like h's dtype, h [..., 2I], ...)
void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& h, double alpha, double limit);
// moe_grouped_gemm(x [R, K], row_index [N] int32 or None, offsets [E+1] int32, weight [E, M, K],
// bias [E, M] or None, fused_swiglu (M even), alpha, limit). Returns N (the grouped row count).
int64_t check_moe_grouped_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& row_index,
                               const at::Tensor& offsets, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, bool fused_swiglu, double alpha,
                               double limit);
// moe_grouped_gemm_backward(grad_out [N, M] in x's dtype, x, row_index, offsets, weight)
void check_moe_grouped_gemm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& row_index,
                                     const at::Tensor& offsets, const at::Tensor& weight);
// moe_grouped_gemm_mxfp4(x [R, K] float32/bf16/fp16, row_index, offsets, blocks [E, M, K/32, 16]
// uint8, scales [E, M, K/32] uint8, bias [E, M] or None, ...). Returns N.
int64_t check_moe_grouped_gemm_mxfp4(const at::Tensor& x, const c10::optional<at::Tensor>& row_index,
                                     const at::Tensor& offsets, const at::Tensor& blocks,
                                     const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                     bool fused_swiglu, double alpha, double limit);
// Host-side value checks of the grouping (CPU kernels): offsets nondecreasing from 0 to N,
// row_index values in [0, R).
void check_grouping_values(const at::Tensor& offsets, const c10::optional<at::Tensor>& row_index,
                           int64_t n_rows, int64_t x_rows, const char* op);
// moe_experts_mxfp4(x [T, d] float32/bf16/fp16, router_logits [T, E] in x's dtype, 1 <= k <= E,
// mlp1 blocks [E, 2I, d/32, 16] / scales [E, 2I, d/32] uint8, mlp1_bias [E, 2I], mlp2 blocks
// [E, d, I/32, 16] / scales [E, d, I/32], mlp2_bias [E, d] (biases in x's dtype), d % 32 == 0,
// I % 32 == 0, alpha, limit).
void check_moe_experts_mxfp4(const at::Tensor& x, const at::Tensor& router_logits, int64_t k,
                             const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales,
                             const at::Tensor& mlp1_bias, const at::Tensor& mlp2_blocks,
                             const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias, double alpha,
                             double limit);
// moe_experts_mxfp4 as the op sequence moe_route -> moe_dispatch -> moe_grouped_gemm_mxfp4
// (fused SwiGLU) -> moe_grouped_gemm_mxfp4 -> moe_combine, called through the dispatcher (so it
// runs on any backend that has those ops): the CUDA kernel, and the CPU kernel above its
// few-token size. Defined in common/moe_compose.cpp.
at::Tensor moe_experts_mxfp4_ops(const at::Tensor& x, const at::Tensor& router_logits, int64_t k,
                                 const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales,
                                 const at::Tensor& mlp1_bias, const at::Tensor& mlp2_blocks,
                                 const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias, double alpha,
                                 double limit);
// moe_combine(y [N, d] float, order [N] int32, weights [T, k] float with T*k == N)
void check_moe_combine(const at::Tensor& y, const at::Tensor& order, const at::Tensor& weights);
// moe_combine_backward(grad_out [T, d] in y's dtype, y, order, weights)
void check_moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& order,
                                const at::Tensor& weights);
// mxfp4_dequantize(blocks [..., G, 16] uint8, scales [..., G] uint8, dtype float)
void check_mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales, c10::ScalarType dtype);
// mxfp4_quantize(w [..., N] float, N % 32 == 0)
void check_mxfp4_quantize(const at::Tensor& w);
// linear(x [..., K] float, weight [N, K] x's dtype, bias [N] x's dtype or None), same device
void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// Accumulation dtype of a float dtype: float64 for float64, else float32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gptoss
