"""GPT-2, the baseline gpt-oss is compared with (gptoss.analysis): its configurations and a plain
PyTorch model with the Hugging Face parameter names (`transformer.wte.weight`, ...), so that its
parameters and FLOPs are counted from a real model and its forward can be checked against
transformers' GPT2LMHeadModel.

GPT-2 (Radford et al., 2019): learned absolute positions, pre-LayerNorm blocks, multi-head
attention (every head its own keys and values; dense causal over the whole context), a GELU MLP
4x wide, a final LayerNorm, and the unembedding tied to the token embedding. Everything gpt-oss
changed is in that list: RMSNorm, RoPE with YaRN, grouped-query attention with sinks and sliding
windows, a top-4 mixture of SwiGLU experts, an untied unembedding.
"""
import dataclasses
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; known: {sorted(GPT2_PRESETS)}")
        return GPT2_PRESETS[name]


# The four released sizes (Hugging Face config.json of gpt2, gpt2-medium, gpt2-large, gpt2-xl).
GPT2_PRESETS: Dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
}


class _Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        # Hugging Face's Conv1D layout: weight [in, out], y = x @ weight + bias
        self.c_attn = _Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = _Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(D)) v, causal
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _Conv1D(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = _Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = _Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class _Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = _Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = _MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Body(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)


class GPT2(nn.Module):
    """GPT-2 language model: tokens [B, T] -> logits [B, T, vocab_size]. Parameter names and
    layouts are Hugging Face's GPT2LMHeadModel's (lm_head is tied to transformer.wte)."""

    def __init__(self, cfg: GPT2Config, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        with torch.device(device or "cpu"):
            self.transformer = _Body(cfg)
        self.to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "GPT2":
        """GPT-2's initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name:  # LayerNorm gains
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"GPT2: tokens must be [B, T], got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.cfg.n_positions:
            raise ValueError(f"GPT2: {T} tokens exceed n_positions ({self.cfg.n_positions})")
        t = self.transformer
        x = t.wte(tokens) + t.wpe(torch.arange(T, device=tokens.device))
        for block in t.h:
            x = block(x)
        return F.linear(t.ln_f(x), t.wte.weight)  # tied unembedding


__all__ = ["GPT2", "GPT2Config", "GPT2_PRESETS"]
