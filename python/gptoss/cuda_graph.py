"""Decode steps replayed as a CUDA graph (one launch per step instead of hundreds).

The graph captures Transformer.step_tensors for a fixed batch size and tokens per step over fixed
caches: a static token buffer in, static logits out. Everything that changes from step to step
lives on the device (the caches' `lengths`, advanced inside the graph; positions and cos/sin
derived from them inside the graph), and no op in the step reads host state or syncs: the
attention decode kernel reads lengths on the device and plans its split-K from the cache size
only, the MoE dispatch/schedule is device-side. The host-side checks and bookkeeping of
Transformer.decode_step run around each replay.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

import gptoss_ext

from .model import Transformer


class CUDAGraphDecoder:
    """`decoder(tokens)` == `model.decode_step(tokens, caches)` for tokens [B, T] (T =
    tokens_per_step), replayed from a CUDA graph captured at construction.

    The caches must stay the ones given here (the graph holds their storage), and the returned
    logits [B, T, vocab] are a static buffer overwritten by the next call (clone to keep them).
    Capturing runs the step a few times (warm-up) and restores the caches' lengths afterwards;
    the key/value slots it writes are past every sequence's length and are rewritten by the next
    real step. The caches need room for T more tokens at construction.
    """

    def __init__(self, model: Transformer, caches: Sequence[gptoss_ext.KVCache], tokens_per_step: int = 1,
                 warmup: int = 2, pool: Optional[tuple] = None):
        if model.device.type != "cuda":
            raise ValueError(f"CUDAGraphDecoder: the model must be on a CUDA device, got {model.device}")
        if tokens_per_step < 1:
            raise ValueError(f"CUDAGraphDecoder: tokens_per_step must be >= 1, got {tokens_per_step}")
        self.model, self.caches = model, list(caches)
        batch = len(self.caches[0].host_lengths)
        self.tokens = torch.zeros(batch, tokens_per_step, dtype=torch.long, device=model.device)
        model._check_caches(self.tokens, self.caches)
        self.cos, self.sin = model.rope_tables(self.caches)  # held here: the graph reads them
        saved = [c.lengths.clone() for c in self.caches]

        def restore():
            for c, l in zip(self.caches, saved):
                c.lengths.copy_(l)

        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy init)
                for _ in range(warmup):
                    model.step_tensors(self.tokens, self.caches, self.cos, self.sin)
                    restore()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = model.step_tensors(self.tokens, self.caches, self.cos, self.sin)
        torch.cuda.current_stream().synchronize()

    def __call__(self, tokens: Tensor) -> Tensor:
        if tuple(tokens.shape) != tuple(self.tokens.shape):
            raise ValueError(f"CUDAGraphDecoder: tokens must be {tuple(self.tokens.shape)} (the captured shape), "
                             f"got {tuple(tokens.shape)}")
        self.model._check_caches(tokens, self.caches)
        self.tokens.copy_(tokens)
        self.graph.replay()
        for c in self.caches:
            c.advance_host(self.tokens.shape[1])
        return self.logits
