"""The gpt-oss Transformer (spec §2.0): embedding, blocks alternating sliding-window and full
attention with a mixture of experts, final RMSNorm, untied unembedding. Runs a full forward over
[B, T] tokens, or an incremental one over per-layer KV caches (ring buffers on sliding layers)."""
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import gptoss_ext

from .checkpoint import load_state_dict, save_checkpoint
from .config import ModelConfig
from .layers import Linear, MLPBlock, RMSNorm, TransformerBlock


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, mxfp4: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.block = nn.ModuleList([TransformerBlock(cfg, n, mxfp4=mxfp4, dtype=dtype, device=device)
                                    for n in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device)
        self.unembedding = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
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
                advance: Optional[Union[int, Sequence[int]]] = None, *, last_only: bool = False) -> Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] in the model dtype.

        Without caches: the tokens are positions 0..T-1 of B sequences (causal, windows per layer).
        With caches (from new_caches): the tokens follow what each sequence's caches hold; the
        caches then advance by `advance` tokens per sequence (default T; for a right-padded batch
        of prompts pass the real lengths, the padding slots are overwritten later).
        last_only: return only each sequence's last token's logits [B, vocab] (token T-1, or
        advance[b]-1 with per-sequence counts), skipping the unembedding of the others (a prefill).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        if caches is None:
            cos, sin = self.rope.cos_sin(torch.arange(t, device=tokens.device))
            x, delta = self.embedding(tokens), None
            for blk in self.block:
                x, delta = blk(x, delta, cos, sin)
            if last_only:
                x, delta = x[:, -1], (None if delta is None else delta[:, -1])
            return self.unembedding(self.norm.add_forward(x, delta)[0])
        if advance is None or (isinstance(advance, int) and advance == t):
            if not last_only:
                return self.decode_step(tokens, caches)
            advance = t
        last = None
        if last_only:
            counts = [advance] * b if isinstance(advance, int) else list(advance)
            if len(counts) != b or any(not 1 <= c <= t for c in counts):
                raise ValueError(f"last_only needs advance in 1..T={t} for each of the {b} sequences, got {advance}")
            last = torch.tensor([c - 1 for c in counts], device=tokens.device)
        self._check_caches(tokens, caches)
        logits = self.step_tensors(tokens, caches, *self.rope_tables(caches), advance=False, last=last)
        for c in caches:
            c.advance(advance)
        return logits

    # ---------------------------------------------------------------- incremental (decode) steps
    #
    # A step over the KV caches is split in three so that its tensor part can be compiled once
    # (torch.compile) or captured once (CUDA graph) and replayed for every step:
    #   1. host checks (_check_caches: cache count, room for T tokens, from host_lengths);
    #   2. step_tensors: device work only. Positions come from the device `lengths`, cos/sin are
    #      gathered from the fixed rope tables inside the step, k/v are written at `lengths`, and
    #      `lengths` is advanced by T on the device. No host state is read, no host sync;
    #   3. host bookkeeping (KVCache.advance_host).

    def _check_caches(self, tokens: Tensor, caches: Sequence[gptoss_ext.KVCache]) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        if len(caches) != len(self.block):
            raise ValueError(f"expected {len(self.block)} caches (one per layer), got {len(caches)}")
        if len(caches[0].host_lengths) != tokens.shape[0]:
            raise ValueError(f"tokens has batch {tokens.shape[0]} but the caches hold "
                             f"{len(caches[0].host_lengths)} sequences")
        for c in caches:
            c.check_room(tokens.shape[1])

    def rope_tables(self, caches: Sequence[gptoss_ext.KVCache]) -> Tuple[Tensor, Tensor]:
        """cos/sin tables [L, head_dim/2] covering every position the caches can hold (L >= max_len);
        the same tensors from call to call, so a compiled or captured step keeps reading them."""
        return self.rope.table(caches[0].k.device, max(c.max_len for c in caches))

    def step_tensors(self, tokens: Tensor, caches: Sequence[gptoss_ext.KVCache], cos_table: Tensor,
                     sin_table: Tensor, advance: bool = True, last: Optional[Tensor] = None) -> Tensor:
        """The device part of an incremental step: tokens [B, T] follow each sequence's cached
        tokens (positions lengths[b] .. lengths[b] + T - 1); writes their keys/values, returns logits
        [B, T, vocab] (with `last` [B] int64: the logits [B, vocab] of token last[b] of each
        sequence only) and, with advance, adds T to every cache's device `lengths`.

        Reads no host state, so it traces under torch.compile(fullgraph=True) without guards on
        lengths and can be captured in a CUDA graph. The caller checks room first (_check_caches)
        and records the advance on the host after (KVCache.advance_host); decode_step does both.
        """
        t = tokens.shape[1]
        positions = caches[0].lengths.long()[:, None] + torch.arange(t, device=tokens.device)
        cos, sin = cos_table[positions], sin_table[positions]  # [B, T, D/2]
        x, delta = self.embedding(tokens), None
        for blk, cache in zip(self.block, caches):
            x, delta = blk(x, delta, cos, sin, cache)
        if advance:  # every layer's lengths in one launch
            torch._foreach_add_([cache.lengths for cache in caches], t)
        if last is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x, delta = x[rows, last], (None if delta is None else delta[rows, last])
        return self.unembedding(self.norm.add_forward(x, delta)[0])

    def decode_step(self, tokens: Tensor, caches: Sequence[gptoss_ext.KVCache],
                    step_fn: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """One incremental step advancing every sequence by T = tokens.shape[1] (a decode step:
        tokens [B, 1]): host checks, `step_fn` (default step_tensors; compile_decode passes a
        compiled one), host bookkeeping. Returns logits [B, T, vocab]."""
        self._check_caches(tokens, caches)
        cos, sin = self.rope_tables(caches)
        logits = (step_fn or self.step_tensors)(tokens, caches, cos, sin)
        for c in caches:
            c.advance_host(tokens.shape[1])
        return logits

    def compile_decode(self, **compile_kwargs) -> Callable[[Tensor, Sequence[gptoss_ext.KVCache]], Tensor]:
        """decode_step with step_tensors compiled by torch.compile(**compile_kwargs) (default
        fullgraph=True, dynamic=False): compiles on the first call, then once per new batch size,
        tokens per step or cache set-up; the step-to-step growth of the lengths does not recompile."""
        kwargs = dict(fullgraph=True, dynamic=False)
        kwargs.update(compile_kwargs)
        compiled = torch.compile(self.step_tensors, **kwargs)
        return functools.partial(self.decode_step, step_fn=compiled)

    def num_parameters(self) -> int:
        """Parameters, counting MXFP4 expert weights as their dense element count."""
        total = sum(p.numel() for p in self.parameters())
        for blk in self.block:
            if blk.mlp.mxfp4:
                total += sum(w.blocks.numel() * 2 for w in (blk.mlp.mlp1_weight, blk.mlp.mlp2_weight))
        return total
