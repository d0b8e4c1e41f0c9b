"""The gpt-oss Transformer (spec §2.0): embedding, blocks alternating sliding-window and full
attention with a mixture of experts, final RMSNorm, untied unembedding. Runs a full forward over
[B, T] tokens, or an incremental one over per-layer KV caches (ring buffers on sliding layers)."""
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

import gptoss_ext

from .checkpoint import load_state_dict, save_checkpoint
from .config import ModelConfig
from .layers import MLPBlock, RMSNorm, TransformerBlock


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, mxfp4: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.block = nn.ModuleList([TransformerBlock(cfg, n, mxfp4=mxfp4, dtype=dtype, device=device)
                                    for n in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device)
        self.unembedding = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        self.rope = gptoss_ext.RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                               cfg.initial_context_length, cfg.rope_ntk_alpha, cfg.rope_ntk_beta)

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, seed: int = 0, mxfp4: bool = False,
                    dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu") -> "Transformer":
        """A randomly initialised model: normal(0, 0.02) weights, zero biases, unit norm scales,
        sinks drawn from normal(0, 1); MXFP4 experts get random E2M1 values at scale 2^-7. Seeded."""
        model = cls(cfg, mxfp4=mxfp4, dtype=dtype, device=device)
        model.init_weights(seed)
        return model

    @classmethod
    def from_checkpoint(cls, path: str, *, device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = torch.bfloat16, mxfp4: str = "keep",
                        progress: bool = True) -> "Transformer":
        """Load a gpt-oss checkpoint folder, OpenAI (`original/`) or Hugging Face layout, detected
        from its files (see gptoss.checkpoint.load_state_dict). MXFP4 expert weights stay MXFP4
        (the MoE kernels run on them) unless mxfp4="dequantize". Norm scales and sinks are kept in
        float32 (spec §2.1); the other float tensors are cast to `dtype` (None: as stored)."""
        cfg, state = load_state_dict(path, device=device, dtype=dtype, mxfp4=mxfp4, progress=progress)
        is_mxfp4 = any(name.endswith(".blocks") for name in state)
        model_dtype = dtype or state["embedding.weight"].dtype
        model = cls(cfg, mxfp4=is_mxfp4, dtype=model_dtype, device="meta")  # no memory until assigned
        for name, t in state.items():
            if name.endswith("norm.scale") or name.endswith("sinks"):
                state[name] = t.float()
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_checkpoint(self, path: str, layout: str = "openai", **kwargs) -> None:
        """Write this model as a checkpoint folder (config.json + safetensors) in either layout."""
        save_checkpoint(self.state_dict(), self.cfg, path, layout=layout, **kwargs)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def normal_(t: Tensor, std: float = 0.02) -> None:
            if t.device.type == "cpu":
                t.normal_(0.0, std, generator=gen)  # in place, in the parameter's dtype
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * std)

        for name, p in self.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif name.endswith("sinks"):
                normal_(p, 1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                normal_(p)
        for blk in self.block:
            mlp: MLPBlock = blk.mlp
            if mlp.mxfp4:
                # Uniform random E2M1 nibbles (RMS 2.93) with scale 2^-7: weights of RMS ~0.023,
                # drawn directly in the packed form (quantising a float draw is far slower).
                for w in (mlp.mlp1_weight, mlp.mlp2_weight):
                    w.blocks.copy_(torch.randint(0, 256, w.blocks.shape, generator=gen, dtype=torch.uint8))
                    w.scales.fill_(127 - 7)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # ---------------------------------------------------------------------------------- forward

    def new_caches(self, batch_size: int, max_len: int, max_step: int = 1) -> List[gptoss_ext.KVCache]:
        """One KV cache per layer for `batch_size` sequences of up to `max_len` tokens, taking up to
        `max_step` tokens per incremental call after the prompt (sliding layers keep a ring)."""
        cfg = self.cfg
        return [gptoss_ext.KVCache(batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
                                   window=cfg.window(n), max_step=max(max_step, 1), dtype=self.dtype,
                                   device=self.device)
                for n in range(cfg.num_hidden_layers)]

    def forward(self, tokens: Tensor, caches: Optional[Sequence[gptoss_ext.KVCache]] = None,
                advance: Optional[Union[int, Sequence[int]]] = None) -> Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] in the model dtype.

        Without caches: the tokens are positions 0..T-1 of B sequences (causal, windows per layer).
        With caches (from new_caches): the tokens follow what each sequence's caches hold; the
        caches then advance by `advance` tokens per sequence (default T; for a right-padded batch
        of prompts pass the real lengths, the padding slots are overwritten later).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        if caches is None:
            cos, sin = self.rope.cos_sin(torch.arange(t, device=tokens.device))
        else:
            if len(caches) != len(self.block):
                raise ValueError(f"expected {len(self.block)} caches (one per layer), got {len(caches)}")
            start = torch.tensor(caches[0].host_lengths, device=tokens.device, dtype=torch.int64)
            cos, sin = self.rope.cos_sin(start[:, None] + torch.arange(t, device=tokens.device))
        x = self.embedding(tokens)
        for n, blk in enumerate(self.block):
            x = blk(x, cos, sin, None if caches is None else caches[n])
        if caches is not None:
            for c in caches:
                c.advance(t if advance is None else advance)
        return self.unembedding(self.norm(x))

    def num_parameters(self) -> int:
        """Parameters, counting MXFP4 expert weights as their dense element count."""
        total = sum(p.numel() for p in self.parameters())
        for blk in self.block:
            if blk.mlp.mxfp4:
                total += sum(w.blocks.numel() * 2 for w in (blk.mlp.mlp1_weight, blk.mlp.mlp2_weight))
        return total
