"""Typed wrappers over torch.ops.gptoss_ext.*, with fake kernels and autograd.

Each public function documents shapes and dtypes; argument checks happen in C++ with messages
that name the argument. Gradients run through the backward ops (CPU and CUDA kernels).
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

_ops = torch.ops.gptoss_ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- RMSNorm (§2.1)

def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim: `(x_f32 * rsqrt(mean(x_f32**2) + eps)) * scale_f32`.

    x: [..., d] float32/bfloat16/float16/float64; scale: [d], any float dtype (float32 in
    gpt-oss), used in float32. Returns x's shape and dtype (contiguous). Differentiable in x
    and scale.
    """
    return _ops.rms_norm(x, scale, float(eps))[0]


@torch.library.register_fake("gptoss_ext::rms_norm")
def _rms_norm_fake(x, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("gptoss_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, scale, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, scale, _ = inputs
    ctx.save_for_backward(x, scale, output[1])


def _rms_norm_backward(ctx, grad_out, grad_rstd):
    x, scale, rstd = ctx.saved_tensors
    grad_x, grad_scale = _ops.rms_norm_backward(grad_out.contiguous(), x, scale, rstd)
    return grad_x, grad_scale, None


torch.library.register_autograd("gptoss_ext::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)


def add_rms_norm(x: Tensor, residual: Tensor, scale: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """The residual add and the next RMSNorm in one pass: returns (rms_norm(s, scale, eps), s) with
    s = x + residual in x's dtype, exactly as that op sequence computes them (a decode step's
    residual stream and the next block's normed input, one launch instead of two on CUDA).

    x, residual: [..., d], same shape and float dtype; scale: [d] as rms_norm's. Both outputs have
    x's shape and dtype (contiguous). Differentiable in x, residual and scale.
    """
    out, s, _ = _ops.add_rms_norm(x, residual, scale, float(eps))
    return out, s


@torch.library.register_fake("gptoss_ext::add_rms_norm")
def _add_rms_norm_fake(x, residual, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, scale, _ = inputs
    ctx.save_for_backward(output[1], scale, output[2])


def _add_rms_norm_backward(ctx, grad_out, grad_sum, grad_rstd):
    s, scale, rstd = ctx.saved_tensors
    grad_s, grad_scale = None, None
    if grad_out is not None:
        grad_s, grad_scale = _ops.rms_norm_backward(grad_out.contiguous(), s, scale, rstd)
    if grad_sum is not None:
        grad_s = grad_sum if grad_s is None else grad_s + grad_sum
    return grad_s, grad_s, grad_scale, None


torch.library.register_autograd("gptoss_ext::add_rms_norm", _add_rms_norm_backward,
                                setup_context=_add_rms_norm_setup)


# ------------------------------------------------------------------------ Dense projection (§2)

def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ weight.T + bias, the model's dense projections (qkv, out, router, unembedding).

    x: [..., K]; weight: [N, K]; bias: [N] or None; one float dtype and device for all. Returns
    [..., N] in x's dtype, contiguous; float32 sums, one rounding. Decode-shaped calls (at most 4
    rows of x; bfloat16 on AVX512-BF16 CPUs, bfloat16 or float16 on CUDA) run the extension's
    weight-streaming GEMV; every other call is the device's BLAS (at::linear; on CUDA without
    cuBLAS's reduced-precision split-K reductions).
    Differentiable in x, weight and bias (the backward is plain matmuls).
    """
    return _ops.linear(x, weight, bias)


@torch.library.register_fake("gptoss_ext::linear")
def _linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = (grad_out @ weight) if ctx.needs_input_grad[0] else None
    grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


torch.library.register_autograd("gptoss_ext::linear", _linear_backward, setup_context=_linear_setup)


# -------------------------------------------------------------------------------- RoPE (§2.3)

def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotary embedding: pairs (i, i + D/2) rotated by (cos, sin).

    x: [B, T, H, D] or [T, H, D] float32/bfloat16/float16/float64; cos, sin: [T, D/2] (shared by
    the batch) or [B, T, D/2] (per-sequence positions), float32, already scaled by the YaRN
    concentration (see `gptoss_ext.RotaryEmbedding`). Math in float32; output in x's dtype.
    Differentiable in x.
    """
    return _ops.apply_rope(x, cos, sin)


@torch.library.register_fake("gptoss_ext::apply_rope")
def _apply_rope_fake(x, cos, sin):
    return x.new_empty(x.shape)


def _apply_rope_setup(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _apply_rope_backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    return _ops.apply_rope(grad_out, cos, -sin), None, None  # the inverse rotation


torch.library.register_autograd("gptoss_ext::apply_rope", _apply_rope_backward, setup_context=_apply_rope_setup)


# --------------------------------------------------------------------------- Attention (§2.2)

def _default_scale(sm_scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def attention(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor] = None, *, sm_scale: Optional[float] = None,
              window: int = 0, q_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Causal grouped-query attention with an optional sliding window and learned sinks.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq % Hkv == 0 (query head h uses kv head
    h // (Hq // Hkv)), D <= 128; float32/bfloat16/float16/float64, all the same dtype.
    sinks: [Hq] raw logits in post-scale units (any float dtype, used in float32), or None.
    sm_scale: logit scale, default 1/sqrt(D). Query i sits at position q_offset + i and sees key
    j iff j <= q_offset + i and (window == 0 or j > q_offset + i - window).

    Returns (out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] float32 (float64 for float64 q)),
    lse the natural-log log-sum-exp of the row's scaled logits including the sink. A row with no
    visible key has out 0 and lse = sink (or -inf). Differentiable in q, k, v and sinks, through
    both outputs (a gradient reaching lse costs one extra forward and backward pass).
    """
    return _ops.attention(q, k, v, sinks, _default_scale(sm_scale, q.shape[-1]), int(window), int(q_offset))


@torch.library.register_fake("gptoss_ext::attention")
def _attention_fake(q, k, v, sinks, sm_scale, window, q_offset):
    b, tq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, tq), dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("gptoss_ext::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, sinks, out, lse, sm_scale, window, q_offset):
    grad_sinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_sinks


def _attention_setup(ctx, inputs, output):
    q, k, v, sinks, sm_scale, window, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse)
    ctx.args = (sm_scale, window, q_offset)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros


def _is_traced(t: Tensor) -> bool:
    """True for the fake tensors (possibly functional-wrapped) seen while tracing (torch.compile,
    export, opcheck), whose values are unknown."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, sinks, out, lse = ctx.saved_tensors
    sm_scale, window, q_offset = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gq, gk, gv, gs = _ops.attention_backward(grad_out.contiguous(), q, k, v, sinks, out, lse, sm_scale, window,
                                             q_offset)
    # A gradient g on lse adds g_i * P_ij to dS (d lse / d s_ij = P_ij, d lse / d sink = p_sink):
    #   dQ_i += scale * g_i * sum_j P_ij k_j  = scale * g_i * attention(q, k, k).out_i
    #   dK_j += scale * sum_i g_i P_ij q_i    = scale * (dV of the backward with grad_out = g * q)
    #   dsink += sum_i g_i * p_sink_i
    # grad_lse is None when lse does not reach the loss (materialize_grads is off). An explicit
    # zero gradient is skipped in eager mode; a traced graph (values unknown) keeps the extra work.
    if grad_lse is not None and (_is_traced(grad_lse) or bool(grad_lse.any())):
        g = grad_lse.to(lse.dtype)                          # [B, Hq, Tq]
        g_rows = g.transpose(1, 2).unsqueeze(-1)            # [B, Tq, Hq, 1]
        pk, _ = _ops.attention(q, k, k, sinks, sm_scale, window, q_offset)
        gq = (gq.to(g.dtype) + sm_scale * g_rows * pk.to(g.dtype)).to(q.dtype)
        gq_out = (g_rows * q.to(g.dtype)).to(q.dtype).contiguous()
        _, _, kg, _ = _ops.attention_backward(gq_out, q, k, v, sinks, out, lse, sm_scale, window, q_offset)
        gk = (gk.to(g.dtype) + sm_scale * kg.to(g.dtype)).to(k.dtype)
        if sinks is not None:
            p_sink = torch.exp(sinks.to(g.dtype).view(1, -1, 1) - lse)
            gs = (gs.to(g.dtype) + (g * p_sink).sum(dim=(0, 2))).to(sinks.dtype)
    return gq, gk, gv, (gs if sinks is not None else None), None, None, None


torch.library.register_autograd("gptoss_ext::attention", _attention_backward, setup_context=_attention_setup)


def kv_cache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *,
                    ring: bool = False) -> None:
    """Write new keys/values into a KV cache in place.

    k_cache, v_cache: [B, S, Hkv, D], contiguous; k, v: [B, Tn, Hkv, D] in the cache's dtype;
    lengths: [B] int32 on the cache's device, the tokens already cached per sequence. Token i of
    sequence b (position lengths[b] + i) goes to slot (lengths[b] + i) % S. ring=False: every
    position must fit (lengths[b] + Tn <= S, else RuntimeError "cache overflow"); ring=True
    keeps the last S positions (sliding-window layers), Tn <= S. lengths is not updated (see
    `gptoss_ext.KVCache`, which keeps it).
    """
    _ops.kv_cache_append(k_cache, v_cache, k, v, lengths, bool(ring))


@torch.library.register_fake("gptoss_ext::kv_cache_append")
def _kv_cache_append_fake(k_cache, v_cache, k, v, lengths, ring):
    return None


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, sinks: Optional[Tensor] = None,
                     *, sm_scale: Optional[float] = None, window: int = 0, ring: bool = False) -> Tuple[Tensor, Tensor]:
    """Attention of Tq new tokens per sequence over a KV cache (inference only, no autograd).

    q: [B, Tq, Hq, D]; k_cache, v_cache: [B, S, Hkv, D] already holding the new tokens (append
    first, with the same lengths); lengths: [B] int32, the tokens cached *before* the new ones, so
    query i of sequence b sits at position lengths[b] + i and sees that sequence's keys at
    positions <= lengths[b] + i (and > lengths[b] + i - window when window > 0): a ragged
    batch. ring=True reads position p from slot p % S and needs window > 0 and
    S >= window + Tq - 1. Same outputs and rules as `attention`.
    """
    return _ops.attention_decode(q, k_cache, v_cache, lengths, sinks, _default_scale(sm_scale, q.shape[-1]),
                                 int(window), bool(ring))


@torch.library.register_fake("gptoss_ext::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, lengths, sinks, sm_scale, window, ring):
    b, tq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, tq), dtype=_acc_dtype(q.dtype))


# -------------------------------------------------------------- Mixture of experts (§2.4, §3.2)

#: An expert weight: a dense [E, out, in] tensor or an MXFP4 (blocks [E, out, in/32, 16] uint8,
#: scales [E, out, in/32] uint8) pair.
ExpertWeight = Union[Tensor, Tuple[Tensor, Tensor]]


def _limit(limit: Optional[float]) -> float:
    return math.inf if limit is None else float(limit)


def moe_route(router_logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k then softmax over the k selected logits.

    router_logits: [T, E] float (any float dtype); 1 <= k <= E. Returns weights [T, k] (float32,
    float64 for float64 logits; each row sums to 1) and experts [T, k] int32 in descending logit
    order, ties broken by the lower expert index. Differentiable in router_logits.
    """
    return _ops.moe_route(router_logits, int(k))


@torch.library.register_fake("gptoss_ext::moe_route")
def _moe_route_fake(router_logits, k):
    t = router_logits.shape[0]
    return (router_logits.new_empty((t, k), dtype=_acc_dtype(router_logits.dtype)),
            router_logits.new_empty((t, k), dtype=torch.int32))


@torch.library.register_fake("gptoss_ext::moe_route_backward")
def _moe_route_backward_fake(grad_weights, weights, experts, num_experts):
    return weights.new_empty((weights.shape[0], num_experts))


def _moe_route_setup(ctx, inputs, output):
    router_logits, _ = inputs
    ctx.num_experts = router_logits.shape[1]
    ctx.logits_dtype = router_logits.dtype
    ctx.save_for_backward(output[0], output[1])


def _moe_route_backward(ctx, grad_weights, grad_experts):
    weights, experts = ctx.saved_tensors
    if grad_weights is None:
        return None, None
    grad = _ops.moe_route_backward(grad_weights.contiguous(), weights, experts, ctx.num_experts)
    return grad.to(ctx.logits_dtype), None


torch.library.register_autograd("gptoss_ext::moe_route", _moe_route_backward, setup_context=_moe_route_setup)


def moe_dispatch(experts: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs by expert (a stable counting sort).

    experts: [T, k] int32, ids in [0, num_experts). Returns order [T*k] int32 (flat slot ids
    t*k + j, expert 0's first, ascending within an expert), row_token [T*k] int32 (= order // k)
    and offsets [num_experts + 1] int32 (expert e owns grouped rows offsets[e]:offsets[e+1]).
    """
    return _ops.moe_dispatch(experts, int(num_experts))


@torch.library.register_fake("gptoss_ext::moe_dispatch")
def _moe_dispatch_fake(experts, num_experts):
    n = experts.shape[0] * experts.shape[1]
    return (experts.new_empty((n,), dtype=torch.int32), experts.new_empty((n,), dtype=torch.int32),
            experts.new_empty((num_experts + 1,), dtype=torch.int32))


def swiglu(h: Tensor, alpha: float = 1.702, limit: Optional[float] = 7.0) -> Tensor:
    """gpt-oss clamped SwiGLU over interleaved columns: h [..., 2I] -> [..., I].

    glu = min(h[..., 0::2], limit), lin = clamp(h[..., 1::2], -limit, limit),
    out = glu * sigmoid(alpha * glu) * (lin + 1); math in float32 (float64 for float64), output in
    h's dtype. limit=None disables both clamps. Differentiable in h.
    """
    return _ops.swiglu(h, float(alpha), _limit(limit))


@torch.library.register_fake("gptoss_ext::swiglu")
def _swiglu_fake(h, alpha, limit):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.register_fake("gptoss_ext::swiglu_backward")
def _swiglu_backward_fake(grad_out, h, alpha, limit):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output):
    h, alpha, limit = inputs
    ctx.alpha, ctx.limit = alpha, limit
    ctx.save_for_backward(h)


def _swiglu_backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return _ops.swiglu_backward(grad_out.contiguous(), h, ctx.alpha, ctx.limit), None, None


torch.library.register_autograd("gptoss_ext::swiglu", _swiglu_backward, setup_context=_swiglu_setup)


def moe_grouped_gemm(x: Tensor, offsets: Tensor, weight: ExpertWeight, bias: Optional[Tensor] = None,
                     row_index: Optional[Tensor] = None, *, fused_swiglu: bool = False, alpha: float = 1.702,
                     limit: Optional[float] = 7.0) -> Tensor:
    """Per-expert linear layer over rows grouped by expert, optionally with the SwiGLU fused.

    x: [R, K]; row_index: [N] int32 (grouped row r reads x[row_index[r]]; moe_dispatch's
    row_token) or None (row r reads x[r], N = R); offsets: [E+1] int32 from moe_dispatch;
    weight: [E, M, K] in x's dtype (openai layout: out, in) or an MXFP4 (blocks, scales) pair;
    bias: [E, M] in x's dtype or None. Returns [N, M] (or [N, M/2] with fused_swiglu, the clamped
    interleaved SwiGLU applied to each row). Differentiable in x, weight and bias for dense
    weights; MXFP4 weights are inference-only (backward raises).
    """
    if isinstance(weight, (tuple, list)):
        if len(weight) != 2:
            raise ValueError("moe_grouped_gemm: an MXFP4 weight must be a (blocks, scales) pair")
        return _ops.moe_grouped_gemm_mxfp4(x, row_index, offsets, weight[0], weight[1], bias, bool(fused_swiglu),
                                           float(alpha), _limit(limit))
    return _ops.moe_grouped_gemm(x, row_index, offsets, weight, bias, bool(fused_swiglu), float(alpha),
                                 _limit(limit))


def _grouped_gemm_out(x, row_index, m, fused_swiglu):
    n = x.shape[0] if row_index is None else row_index.shape[0]
    return x.new_empty((n, m // 2 if fused_swiglu else m))


@torch.library.register_fake("gptoss_ext::moe_grouped_gemm")
def _moe_grouped_gemm_fake(x, row_index, offsets, weight, bias, fused_swiglu, alpha, limit):
    return _grouped_gemm_out(x, row_index, weight.shape[1], fused_swiglu)


@torch.library.register_fake("gptoss_ext::moe_grouped_gemm_mxfp4")
def _moe_grouped_gemm_mxfp4_fake(x, row_index, offsets, blocks, scales, bias, fused_swiglu, alpha, limit):
    return _grouped_gemm_out(x, row_index, blocks.shape[1], fused_swiglu)


@torch.library.register_fake("gptoss_ext::moe_grouped_gemm_backward")
def _moe_grouped_gemm_backward_fake(grad_out, x, row_index, offsets, weight, output_mask):
    e, m = weight.shape[0], weight.shape[1]
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(weight.shape if output_mask[1] else (0,)),
            x.new_empty((e, m) if output_mask[2] else (0,)))


def _moe_grouped_gemm_setup(ctx, inputs, output):
    x, row_index, offsets, weight, bias, fused_swiglu, alpha, limit = inputs
    ctx.fused_swiglu, ctx.alpha, ctx.limit = fused_swiglu, alpha, limit
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, row_index, offsets, weight, bias)


def _moe_grouped_gemm_backward(ctx, grad_out):
    x, row_index, offsets, weight, bias = ctx.saved_tensors
    grad_h = grad_out.contiguous()
    if ctx.fused_swiglu:  # recompute the pre-activation, then undo the SwiGLU
        h = _ops.moe_grouped_gemm(x, row_index, offsets, weight, bias, False, ctx.alpha, ctx.limit)
        grad_h = _ops.swiglu_backward(grad_h, h, ctx.alpha, ctx.limit)
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[3]), bool(ctx.has_bias and need[4])]
    gx, gw, gb = _ops.moe_grouped_gemm_backward(grad_h, x, row_index, offsets, weight, mask)
    return (gx if mask[0] else None, None, None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None)


torch.library.register_autograd("gptoss_ext::moe_grouped_gemm", _moe_grouped_gemm_backward,
                                setup_context=_moe_grouped_gemm_setup)


def _moe_grouped_gemm_mxfp4_setup(ctx, inputs, output):
    pass


def _moe_grouped_gemm_mxfp4_backward(ctx, grad_out):
    raise RuntimeError("moe_grouped_gemm_mxfp4: MXFP4 expert weights are inference-only; there is no "
                       "backward. Dequantize them (gptoss_ext.ops.mxfp4_dequantize) to train or to "
                       "differentiate through the MoE block.")


torch.library.register_autograd("gptoss_ext::moe_grouped_gemm_mxfp4", _moe_grouped_gemm_mxfp4_backward,
                                setup_context=_moe_grouped_gemm_mxfp4_setup)


def moe_combine(y: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of each token's k expert outputs.

    y: [N, d] grouped expert outputs (bias included); order: [N] int32 from moe_dispatch; weights:
    [T, k] routing weights (any float dtype), N = T*k. out[t] = sum_j weights[t, j] * y[row of
    slot t*k + j], in float32 (float64 for float64 y); returns [T, d] in y's dtype.
    Differentiable in y and weights.
    """
    return _ops.moe_combine(y, order, weights)


@torch.library.register_fake("gptoss_ext::moe_combine")
def _moe_combine_fake(y, order, weights):
    return y.new_empty((weights.shape[0], y.shape[1]))


@torch.library.register_fake("gptoss_ext::moe_combine_backward")
def _moe_combine_backward_fake(grad_out, y, order, weights):
    return y.new_empty(y.shape), weights.new_empty(weights.shape)


def _moe_combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _moe_combine_backward(ctx, grad_out):
    y, order, weights = ctx.saved_tensors
    gy, gw = _ops.moe_combine_backward(grad_out.contiguous(), y, order, weights)
    return gy, None, gw


torch.library.register_autograd("gptoss_ext::moe_combine", _moe_combine_backward, setup_context=_moe_combine_setup)


@torch.library.register_fake("gptoss_ext::moe_experts_mxfp4")
def _moe_experts_mxfp4_fake(x, router_logits, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                            mlp2_bias, alpha, limit):
    return x.new_empty(x.shape)


def _moe_experts_mxfp4_setup(ctx, inputs, output):
    pass


def _moe_experts_mxfp4_backward(ctx, grad_out):
    raise RuntimeError("moe_mlp: MXFP4 expert weights are inference-only; there is no backward through "
                       "moe_experts_mxfp4 (use dense bf16/fp32 expert weights to train)")


torch.library.register_autograd("gptoss_ext::moe_experts_mxfp4", _moe_experts_mxfp4_backward,
                                setup_context=_moe_experts_mxfp4_setup)


def mxfp4_dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Decode MXFP4: blocks [..., G, 16] uint8 (low nibble = even element), scales [..., G] uint8
    (E8M0, bias 127) -> [..., 32*G] in dtype; each value FP4_VALUES[nibble] * 2^(scale - 127)
    formed exactly and rounded once (the rules of reference.mxfp4_dequantize)."""
    return _ops.mxfp4_dequantize(blocks, scales, dtype)


@torch.library.register_fake("gptoss_ext::mxfp4_dequantize")
def _mxfp4_dequantize_fake(blocks, scales, dtype):
    return blocks.new_empty((*scales.shape[:-1], 32 * scales.shape[-1]), dtype=dtype)


def mxfp4_quantize(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Encode w [..., N] (N % 32 == 0, finite) as MXFP4 along the last dim: returns blocks
    [..., N/32, 16] uint8 and scales [..., N/32] uint8, exactly as reference.mxfp4_quantize
    (nearest E2M1 value at the smallest scale that holds the block's max; ties to even)."""
    return _ops.mxfp4_quantize(w)


@torch.library.register_fake("gptoss_ext::mxfp4_quantize")
def _mxfp4_quantize_fake(w):
    g = w.shape[-1] // 32
    return (w.new_empty((*w.shape[:-1], g, 16), dtype=torch.uint8),
            w.new_empty((*w.shape[:-1], g), dtype=torch.uint8))


def _expert_dims(weight: ExpertWeight, name: str) -> Tuple[int, int, int]:
    """Logical [E, out, in] of a dense weight or an MXFP4 pair (shape errors name `name`)."""
    if isinstance(weight, (tuple, list)):
        if len(weight) != 2:
            raise ValueError(f"moe_mlp: {name} as MXFP4 must be a (blocks, scales) pair, got {len(weight)} items")
        blocks = weight[0]
        if blocks.dim() != 4 or blocks.shape[-1] != 16:
            raise ValueError(f"moe_mlp: {name} blocks must be [E, out, in/32, 16], got {tuple(blocks.shape)}")
        return blocks.shape[0], blocks.shape[1], 32 * blocks.shape[2]
    if weight.dim() != 3:
        raise ValueError(f"moe_mlp: {name} must be [E, out, in], got {tuple(weight.shape)}")
    return tuple(weight.shape)


def moe_mlp(x: Tensor, gate_weight: Tensor, gate_bias: Tensor, mlp1_weight: ExpertWeight, mlp1_bias: Tensor,
            mlp2_weight: ExpertWeight, mlp2_bias: Tensor, *, k: int = 4, alpha: float = 1.702,
            limit: Optional[float] = 7.0) -> Tensor:
    """The gpt-oss MoE block (after its RMSNorm, before the residual), spec §2.4, on native ops.

    x: [T, d] float; gate_weight [E, d], gate_bias [E]; mlp1_weight [E, 2I, d] or an MXFP4
    (blocks [E, 2I, d/32, 16], scales [E, 2I, d/32]) pair, mlp1_bias [E, 2I]; mlp2_weight
    [E, d, I] or a pair, mlp2_bias [E, d]. Dense weights and all biases are cast to x's dtype.
    Router logits = x @ gate_weight^T + gate_bias (in x's dtype); top-k then softmax (float32);
    for each selected expert, y = W2 swiglu(W1 x + b1) + b2; out = sum of the routing-weighted y.
    Returns [T, d] in x's dtype. Differentiable in x, the router and every dense expert weight and
    bias; MXFP4 weights are inference-only (backward raises).
    """
    if x.dim() != 2:
        raise ValueError(f"moe_mlp: x must be [T, d], got {tuple(x.shape)}")
    d = x.shape[1]
    n_experts = gate_weight.shape[0]
    if gate_weight.dim() != 2 or gate_weight.shape[1] != d or tuple(gate_bias.shape) != (n_experts,):
        raise ValueError(f"moe_mlp: gate_weight must be [E, d={d}] and gate_bias [E]; got "
                         f"{tuple(gate_weight.shape)}, {tuple(gate_bias.shape)}")
    e1, two_i, d1 = _expert_dims(mlp1_weight, "mlp1_weight")
    e2, d2, inter = _expert_dims(mlp2_weight, "mlp2_weight")
    if e1 != n_experts or d1 != d or two_i % 2 or tuple(mlp1_bias.shape) != (n_experts, two_i):
        raise ValueError(f"moe_mlp: mlp1_weight must be [E={n_experts}, 2I, d={d}] with mlp1_bias [E, 2I]; got "
                         f"{(e1, two_i, d1)}, mlp1_bias {tuple(mlp1_bias.shape)}")
    if e2 != n_experts or d2 != d or inter != two_i // 2 or tuple(mlp2_bias.shape) != (n_experts, d):
        raise ValueError(f"moe_mlp: mlp2_weight must be [E={n_experts}, d={d}, I={two_i // 2}] with mlp2_bias "
                         f"[E, d]; got {(e2, d2, inter)}, mlp2_bias {tuple(mlp2_bias.shape)}")

    dtype = x.dtype

    def dense(w):
        return w if isinstance(w, (tuple, list)) else w.to(dtype)

    logits = linear(x, gate_weight.to(dtype), gate_bias.to(dtype))
    if isinstance(mlp1_weight, (tuple, list)) and isinstance(mlp2_weight, (tuple, list)):
        # the same op sequence as below in one call (fused for few tokens on the CPU)
        return _ops.moe_experts_mxfp4(x, logits, int(k), mlp1_weight[0], mlp1_weight[1], mlp1_bias.to(dtype),
                                      mlp2_weight[0], mlp2_weight[1], mlp2_bias.to(dtype), float(alpha), _limit(limit))
    weights, experts = moe_route(logits, k)
    order, row_token, offsets = moe_dispatch(experts, n_experts)
    w1, b1, w2, b2 = dense(mlp1_weight), mlp1_bias.to(dtype), dense(mlp2_weight), mlp2_bias.to(dtype)
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_weight, gate_bias, b1, b2, *(w for w in (w1, w2) if isinstance(w, Tensor))))
    if training:  # keep h for the backward instead of recomputing it
        h = moe_grouped_gemm(x, offsets, w1, b1, row_token)
        a = swiglu(h, alpha, limit)
    else:
        a = moe_grouped_gemm(x, offsets, w1, b1, row_token, fused_swiglu=True, alpha=alpha, limit=limit)
    y = moe_grouped_gemm(a, offsets, w2, b2)
    return moe_combine(y, order, weights)


__all__ = ["rms_norm", "add_rms_norm", "linear", "apply_rope", "attention", "kv_cache_append", "attention_decode", "moe_route",
           "moe_dispatch", "swiglu", "moe_grouped_gemm", "moe_combine", "mxfp4_dequantize", "mxfp4_quantize",
           "moe_mlp"]
