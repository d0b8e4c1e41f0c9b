// Every op schema of gptoss_ext, once. Kernels register per backend in cpu/*.cpp and cuda/*.cu;
// fake (meta) kernels and autograd live in gptoss_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gptoss_ext, m) {
  // RMSNorm (spec §2.1). x [..., d]; scale [d]; out like x; rstd = 1/sqrt(mean(x^2)+eps) per row,
  // shape x.shape[:-1], float32 (float64 for float64 x).
  m.def("rms_norm(Tensor x, Tensor scale, float eps) -> (Tensor out, Tensor rstd)");
  // grad_x like x; grad_scale [d] in scale's dtype.
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor rstd)"
        " -> (Tensor grad_x, Tensor grad_scale)");
  // Residual add then RMSNorm, fused: sum = x + residual (rounded to x's dtype, as torch's add),
  // out = rms_norm(sum, scale, eps), rstd as rms_norm's: exactly that op sequence, one pass.
  // residual like x (shape and dtype). Returns out and sum like x (contiguous), rstd x.shape[:-1].
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor scale, float eps)"
        " -> (Tensor out, Tensor sum, Tensor rstd)");
  // Dense projection y = x W^T + b (the qkv, out, router and unembedding projections, spec §2).
  // x [..., K]; weight [N, K] row-major; bias [N] or None; all one dtype; y [..., N] in x's dtype.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Half-split RoPE (spec §2.3). x [B, T, H, D] or [T, H, D]; cos, sin [T, D/2] or [B, T, D/2]
  // (already multiplied by the YaRN concentration). The backward is apply_rope(grad, cos, -sin).
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");

  // Attention with learned sinks, GQA, causal + optional sliding window (spec §2.2).
  // q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], Hq % Hkv == 0 (query head h uses kv head h / (Hq/Hkv));
  // sinks [Hq] any float dtype (used in float32) or None. Query i sits at position q_offset + i and
  // sees key j iff j <= q_offset + i and (window == 0 or j > q_offset + i - window).
  // out [B, Tq, Hq, D] in q's dtype; lse [B, Hq, Tq] float32 (float64 for float64 q), natural log,
  // including the sink. A row with no visible key has out 0 and lse = sink (or -inf).
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? sinks, float sm_scale, int window, int q_offset)"
        " -> (Tensor out, Tensor lse)");
  // grad_sinks is [Hq] in sinks' dtype, or an empty tensor when sinks is None.
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor out,"
        " Tensor lse, float sm_scale, int window, int q_offset)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // KV cache: k_cache, v_cache [B, S, Hkv, D]; lengths [B] int32 = tokens already cached per
  // sequence (the position of the first new token). Token position p lives in slot p % S: with
  // ring=false the cache must hold every position (lengths + Tn <= S, else an error), with
  // ring=true it keeps the last S positions (sliding-window layers).
  m.def("kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor lengths,"
        " bool ring) -> ()");
  // Attention of Tq new tokens per sequence over the cache (after kv_cache_append with the same
  // lengths): query i of sequence b sits at position lengths[b] + i. ring=true needs window > 0
  // and S >= window + Tq - 1 so that every visible key is still in the ring.
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? sinks,"
        " float sm_scale, int window, bool ring) -> (Tensor out, Tensor lse)");
  // ---- Mixture of experts (spec §2.4, §3.2). Shapes: T tokens, E experts, k experts per token,
  // N = T*k grouped rows (one per (token, slot) pair), d hidden, I expert intermediate size.
  // Index tensors (experts, order, row_token, offsets, row_index) are int32, on the data's device.
  //
  // Top-k then softmax (spec §2.4 step 3). router_logits [T, E] float (any float dtype), 1 <= k <= E.
  // experts [T, k] int32: the k largest logits per token in descending order, ties broken by the
  // lower expert index (NaN counts as larger than any number, as in a descending torch.sort).
  // weights [T, k]: softmax over the k selected logits, float32 (float64 for float64 logits).
  m.def("moe_route(Tensor router_logits, int k) -> (Tensor weights, Tensor experts)");
  // grad_logits [T, num_experts] in weights' dtype: w * (g - sum_j w_j g_j) at the selected
  // experts, 0 elsewhere (the softmax Jacobian; top-k selection itself has no gradient).
  m.def("moe_route_backward(Tensor grad_weights, Tensor weights, Tensor experts, int num_experts)"
        " -> Tensor grad_logits");
  // Counting sort of the (token, slot) pairs by expert. experts [T, k] int32 with every id in
  // [0, num_experts) (an id outside raises an error naming `experts`; CPU checks it, a device
  // backend may check with a device-side flag). Returns
  //   order [N] int32: flat slot ids s = t*k + j grouped by expert (expert 0 first), ascending s
  //     within an expert (stable);
  //   row_token [N] int32: order / k, the token of each grouped row (the grouped GEMM's row_index);
  //   offsets [E+1] int32: expert e owns grouped rows [offsets[e], offsets[e+1]); offsets[0] = 0,
  //     offsets[E] = N.
  m.def("moe_dispatch(Tensor experts, int num_experts) -> (Tensor order, Tensor row_token, Tensor offsets)");
  // gpt-oss clamped SwiGLU on interleaved columns (spec §2.4 step 4). h [..., 2I] float;
  // glu = min(h[..., 0::2], limit), lin = clamp(h[..., 1::2], -limit, limit);
  // out [..., I] = glu * sigmoid(alpha * glu) * (lin + 1), math in float32 (float64 for float64),
  // one rounding to h's dtype. alpha finite; limit > 0, +inf disables both clamps.
  m.def("swiglu(Tensor h, float alpha, float limit) -> Tensor");
  // grad_h [..., 2I] in h's dtype; a clamped input gets zero gradient (glu >= limit,
  // |lin| >= limit: at exactly +-limit the gradient is 0, as torch.clamp's backward gives).
  m.def("swiglu_backward(Tensor grad_out, Tensor h, float alpha, float limit) -> Tensor grad_h");
  // Grouped expert GEMM: out[r] = act(W_e @ x[row_index[r]] + b_e) for grouped row r of expert e
  // (offsets[e] <= r < offsets[e+1]). x [R, K] float; row_index [N] int32 with values in [0, R),
  // or None for row_index[r] = r (then R = N); offsets [E+1] int32, nondecreasing, offsets[0] = 0,
  // offsets[E] = N (CPU checks the values; a device backend trusts moe_dispatch); weight
  // [E, M, K] (openai layout: out, in) and bias [E, M] or None, both in x's dtype.
  // act = swiglu(., alpha, limit) over interleaved column pairs when fused_swiglu (M even,
  // out [N, M/2]), identity otherwise (out [N, M]; alpha and limit unused).
  // Accumulation in float32 (float64 for float64 x); bias and SwiGLU are applied to the float
  // accumulator and the result is rounded once to x's dtype (rows may be summed in any order).
  m.def("moe_grouped_gemm(Tensor x, Tensor? row_index, Tensor offsets, Tensor weight, Tensor? bias,"
        " bool fused_swiglu, float alpha, float limit) -> Tensor");
  // Backward of the unfused GEMM (fused_swiglu=False; the autograd of the fused form recomputes h
  // and applies swiglu_backward first). grad_out [N, M] in x's dtype. Returns
  //   grad_x [R, K] (rows that appear several times in row_index get the sum of their grads),
  //   grad_weight [E, M, K] (dW_e = grad_out_e^T @ x_e over the expert's rows; 0 for an expert
  //   with no rows), grad_bias [E, M] (column sums of grad_out_e), all in x's dtype.
  // output_mask picks which are computed; the others come back as empty [0] tensors.
  m.def("moe_grouped_gemm_backward(Tensor grad_out, Tensor x, Tensor? row_index, Tensor offsets,"
        " Tensor weight, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The same GEMM with MXFP4 expert weights (W4A16, spec §3.2): blocks [E, M, K/32, 16] uint8
  // (low nibble = even element) and scales [E, M, K/32] uint8 (E8M0, bias 127) instead of weight;
  // K % 32 == 0. Weights are decoded inside the kernel to exact float values
  // (FP4_VALUES[nibble] * 2^(scale - 127), as mxfp4_dequantize) and never stored whole in a
  // wider dtype. x float32/bfloat16/float16; bias [E, M] in x's dtype or None. Inference only.
  m.def("moe_grouped_gemm_mxfp4(Tensor x, Tensor? row_index, Tensor offsets, Tensor blocks,"
        " Tensor scales, Tensor? bias, bool fused_swiglu, float alpha, float limit) -> Tensor");
  // The expert half of the MoE block with MXFP4 weights, from router logits to the combined output
  // (spec §2.4 steps 3-5): exactly moe_route(router_logits, k) -> moe_dispatch ->
  // moe_grouped_gemm_mxfp4(x, row_token, mlp1, fused SwiGLU) -> moe_grouped_gemm_mxfp4(mlp2) ->
  // moe_combine, each step rounding as that op does. x [T, d] float32/bfloat16/float16;
  // router_logits [T, E] in x's dtype; mlp1_blocks [E, 2I, d/32, 16] / mlp1_scales [E, 2I, d/32]
  // uint8 with mlp1_bias [E, 2I]; mlp2_blocks [E, d, I/32, 16] / mlp2_scales [E, d, I/32] with
  // mlp2_bias [E, d]; biases in x's dtype; d and I multiples of 32. Returns [T, d] in x's dtype.
  // One call so that a backend can run a few-token (decode) step as one fused pass. Inference only.
  m.def("moe_experts_mxfp4(Tensor x, Tensor router_logits, int k, Tensor mlp1_blocks, Tensor mlp1_scales,"
        " Tensor mlp1_bias, Tensor mlp2_blocks, Tensor mlp2_scales, Tensor mlp2_bias, float alpha, float limit)"
        " -> Tensor");
  // Weighted sum of each token's expert outputs (spec §2.4 step 5). y [N, d] float, grouped rows;
  // order [N] int32 from moe_dispatch (a permutation of 0..N-1; grouped row r holds slot order[r]);
  // weights [T, k] float (any float dtype), N = T*k. out[t] = sum_j weights[t, j] * y[row of slot
  // t*k+j], summed over j = 0..k-1 in float32 (float64 for float64 y); out [T, d] in y's dtype.
  m.def("moe_combine(Tensor y, Tensor order, Tensor weights) -> Tensor");
  // grad_y [N, d] in y's dtype (grad_y[r] = weights[t, j] * grad_out[t] for slot t*k+j = order[r]);
  // grad_weights [T, k] in weights' dtype (dot(grad_out[t], y[row of slot t*k+j])).
  m.def("moe_combine_backward(Tensor grad_out, Tensor y, Tensor order, Tensor weights)"
        " -> (Tensor grad_y, Tensor grad_weights)");
  // MXFP4 decode (spec §3.2): blocks [..., G, 16] uint8, scales [..., G] uint8 ->
  // [..., 32*G] in dtype (float32/bfloat16/float16/float64). Each value FP4_VALUES[nibble] *
  // 2^(scale - 127) is formed exactly and rounded once; out of float32's range (scale >= 253 with
  // large nibbles) gives inf except for float64; scale byte 255 means 2^128 (no NaN special case).
  m.def("mxfp4_dequantize(Tensor blocks, Tensor scales, ScalarType dtype) -> Tensor");
  // MXFP4 encode along the last dim: w [..., N] float, N % 32 == 0, finite (CPU raises on
  // non-finite input) -> blocks [..., N/32, 16] uint8, scales [..., N/32] uint8. Scale exponent
  // e = ceil(log2(amax / 6)) clamped to [-127, 127] (0 for an all-zero block); each element goes to
  // the nearest E2M1 value at that scale, ties to the even nibble, saturating at 6, zero as +0.
  // Exactly the rules of gptoss_ext.reference.mxfp4_quantize; quantize(dequantize(b, s)) == (b, s)
  // for grids it produced.
  m.def("mxfp4_quantize(Tensor w) -> (Tensor blocks, Tensor scales)");
}

// `import gptoss_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
