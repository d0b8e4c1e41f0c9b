"""The gpt-oss layers (spec §2), every hot op through gptoss_ext.ops. Parameter names equal the
OpenAI checkpoint names (spec §3.1), so `Transformer.state_dict()` is an OpenAI-layout checkpoint.

Dense projections (qkv, out, router, unembedding) are ops.linear (the extension's weight-streaming
GEMV for decode-shaped calls, the device's BLAS otherwise); RMSNorm, RoPE, attention and the MoE
run on the extension's kernels.
"""
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

import gptoss_ext
from gptoss_ext import ops

from .config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and initialisation) whose forward is ops.linear."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm with a float32 `scale` (spec §2.1)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.scale, self.eps)

    def add_forward(self, x: Tensor, delta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(norm(x + delta), x + delta), the sum formed in the norm's pass (x alone when delta is
        None): how a block closes the previous block's residual add."""
        if delta is None:
            return self.forward(x), x
        return ops.add_rms_norm(x, delta, self.scale, self.eps)


class AttentionBlock(nn.Module):
    """Pre-norm attention with fused QKV, YaRN RoPE, GQA, learned sinks and (on sliding layers) a
    window (spec §2.2). Takes and returns the residual stream as a pair (see TransformerBlock):
    (x, delta) -> (x + delta, attn(x + delta))."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.window(layer)
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device)
        self.qkv = Linear(cfg.hidden_size, hd * (hq + 2 * hkv), bias=True, dtype=dtype, device=device)
        self.sinks = nn.Parameter(torch.empty(hq, dtype=torch.float32, device=device))
        self.out = Linear(hd * hq, cfg.hidden_size, bias=True, dtype=dtype, device=device)
        self.observer: Optional[Callable[[Tensor], None]] = None  # see forward

    def forward(self, x: Tensor, delta: Optional[Tensor], cos: Tensor, sin: Tensor,
                cache: Optional[gptoss_ext.KVCache] = None) -> Tuple[Tensor, Tensor]:
        """x, delta [B, T, d] (delta None: 0); cos/sin [T, D/2] or [B, T, D/2] for the tokens'
        positions. Without a cache the T tokens are positions 0..T-1 of their sequences; with one
        they follow its contents (written with KVCache.write: the caller has checked the cache's
        room for T tokens)."""
        cfg = self.cfg
        b, t, _ = x.shape
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        normed, x = self.norm.add_forward(x, delta)
        qkv = self.qkv(normed)
        # RoPE on the q and k heads in one call (one launch when decoding)
        qk = ops.apply_rope(qkv[..., : (hq + hkv) * hd].reshape(b, t, hq + hkv, hd), cos, sin)
        q, k = qk[:, :, :hq], qk[:, :, hq:]
        v = qkv[..., (hq + hkv) * hd:].reshape(b, t, hkv, hd)
        if cache is None:
            o, lse = ops.attention(q, k, v, self.sinks, sm_scale=self.sm_scale, window=self.window)
        else:
            cache.write(k, v.contiguous())
            o, lse = cache.attend(q, self.sinks, sm_scale=self.sm_scale)
        if self.observer is not None:  # gptoss.analysis.study: lse [B, Hq, T], sink included
            self.observer(lse)
        return x, self.out(o.reshape(b, t, hq * hd))


class MXFP4Weight(nn.Module):
    """An MXFP4 expert weight as stored in the checkpoint: `blocks` [E, M, K/32, 16] uint8 and
    `scales` [E, M, K/32] uint8 (spec §3.2). Buffers, not parameters: inference only."""

    def __init__(self, experts: int, rows: int, cols: int, device=None):
        super().__init__()
        if cols % 32:
            raise ValueError(f"MXFP4 weights need the reduction dim to be a multiple of 32, got {cols}")
        self.register_buffer("blocks", torch.zeros(experts, rows, cols // 32, 16, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.full((experts, rows, cols // 32), 127, dtype=torch.uint8, device=device))

    def pair(self) -> Tuple[Tensor, Tensor]:
        return self.blocks, self.scales


class MLPBlock(nn.Module):
    """Pre-norm mixture of experts: router (linear + bias), top-k then softmax, per expert
    W1 -> clamped interleaved SwiGLU -> W2, weighted sum (spec §2.4). Residual stream as a pair:
    (x, delta) -> (x + delta, moe(x + delta))."""

    def __init__(self, cfg: ModelConfig, mxfp4: bool = False, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.norm = RMSNorm(d, cfg.rms_norm_eps, device=device)
        self.gate = Linear(d, e, bias=True, dtype=dtype, device=device)
        if mxfp4:
            self.mlp1_weight = MXFP4Weight(e, 2 * i, d, device=device)
            self.mlp2_weight = MXFP4Weight(e, d, i, device=device)
        else:
            self.mlp1_weight = nn.Parameter(torch.empty(e, 2 * i, d, dtype=dtype, device=device))
            self.mlp2_weight = nn.Parameter(torch.empty(e, d, i, dtype=dtype, device=device))
        self.mlp1_bias = nn.Parameter(torch.empty(e, 2 * i, dtype=dtype, device=device))
        self.mlp2_bias = nn.Parameter(torch.empty(e, d, dtype=dtype, device=device))
        self.observer: Optional[Callable[[Tensor], None]] = None  # see forward

    @property
    def mxfp4(self) -> bool:
        return isinstance(self.mlp1_weight, MXFP4Weight)

    def forward(self, x: Tensor, delta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        shape = x.shape
        normed, x = self.norm.add_forward(x, delta)
        t = normed.reshape(-1, shape[-1])
        w1 = self.mlp1_weight.pair() if self.mxfp4 else self.mlp1_weight
        w2 = self.mlp2_weight.pair() if self.mxfp4 else self.mlp2_weight
        if self.observer is not None:  # gptoss.analysis.study: the router's input [B*T, d]
            self.observer(t)
        y = ops.moe_mlp(t, self.gate.weight, self.gate.bias, w1, self.mlp1_bias, w2, self.mlp2_bias,
                        k=self.cfg.experts_per_token, alpha=self.cfg.swiglu_alpha, limit=self.cfg.swiglu_limit)
        return x, y.reshape(shape)


class TransformerBlock(nn.Module):
    """Attention then MoE, each with its residual add. The residual stream travels as a pair
    (x, delta) meaning x + delta: each add is done by the next norm's pass (ops.add_rms_norm), so
    a decode step runs no separate add kernels. The model's first block gets (embedding, None),
    the final norm closes the last pair."""

    def __init__(self, cfg: ModelConfig, layer: int, mxfp4: bool = False, dtype=None, device=None):
        super().__init__()
        self.attn = AttentionBlock(cfg, layer, dtype=dtype, device=device)
        self.mlp = MLPBlock(cfg, mxfp4=mxfp4, dtype=dtype, device=device)

    def forward(self, x: Tensor, delta: Optional[Tensor], cos: Tensor, sin: Tensor,
                cache: Optional[gptoss_ext.KVCache] = None) -> Tuple[Tensor, Tensor]:
        """(x, delta) [B, T, d] each (delta None: 0) -> (x', delta'), the block's output x' + delta'."""
        return self.mlp(*self.attn(x, delta, cos, sin, cache))
