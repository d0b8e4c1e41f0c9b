"""Typed wrappers over torch.ops.gptoss_ext.*, with fake kernels and autograd.

Each public function documents shapes and dtypes; argument checks happen in C++ with messages
that name the argument. Gradients run through the backward ops (CPU and CUDA kernels).
"""
from typing import Tuple

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

__all__ = ["rms_norm", "apply_rope"]
