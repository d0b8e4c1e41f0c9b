"""Typed wrappers over torch.ops.gptoss_ext.*, with fake kernels and autograd.

Each public function documents shapes and dtypes; argument checks happen in C++ with messages
that name the argument. Gradients run through the backward ops (CPU and CUDA kernels).
"""
import math
from typing import Optional, Tuple

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


__all__ = ["rms_norm", "apply_rope", "attention", "kv_cache_append", "attention_decode"]
