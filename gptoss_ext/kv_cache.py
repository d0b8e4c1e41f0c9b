"""KV cache of one attention layer for batched generation (ragged lengths, ring for sliding windows).

Typical step: `cache.append(k, v)` writes the new tokens' keys/values, `cache.attend(q, sinks)`
runs their attention over everything cached (the new tokens included), `cache.advance(n)` moves
the lengths past them. Prompts of different lengths: append the padded prompt [B, T] and advance
each sequence by its own length (`advance([5, 3])`); the padding slots are overwritten later.

For a compiled or CUDA-graph step the host and device parts are separate: `check_room(n)` (host),
then `write`, `attend` and `lengths.add_(n)` (device only, no host state read), then
`advance_host(n)` (host).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .ops import attention_decode, kv_cache_append

__all__ = ["KVCache"]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class KVCache:
    """Keys and values of one layer: k, v [B, S, Hkv, D] plus per-sequence lengths.

    Full-attention layers (window=0) keep every position: S = max_len, position p in slot p.
    Sliding-window layers (window > 0) keep a ring of S = round_up(window + max_step - 1, 64)
    slots (position p in slot p % S), enough for a step of up to max_step new tokens to see its
    whole window; when max_len is no larger than that, a plain cache of max_len slots is used.

    lengths: [B] int32 on the cache's device (what the kernels read); host_lengths: the same
    values on the host, used to reject overflows before any write.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, *, window: int = 0,
                 max_step: int = 1, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu"):
        if batch_size < 1 or max_len < 1 or n_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"KVCache: batch_size, max_len, n_kv_heads and head_dim must be >= 1, got "
                             f"{batch_size}, {max_len}, {n_kv_heads}, {head_dim}")
        if window < 0 or max_step < 1:
            raise ValueError(f"KVCache: window must be >= 0 and max_step >= 1, got {window} and {max_step}")
        self.window, self.max_len, self.max_step = int(window), int(max_len), int(max_step)
        ring_slots = _round_up(window + max_step - 1, 64) if window > 0 else 0
        self.ring = 0 < ring_slots < max_len
        slots = ring_slots if self.ring else max_len
        self.k = torch.zeros(batch_size, slots, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths: List[int] = [0] * batch_size

    @property
    def slots(self) -> int:
        """S, the number of token slots per sequence."""
        return self.k.shape[1]

    def check_room(self, tn: int) -> None:
        """Raise unless every sequence can take `tn` more tokens in one step (host state only)."""
        if self.ring and tn > self.max_step:
            raise ValueError(f"KVCache: {tn} tokens at once exceed max_step = {self.max_step} of this "
                             f"sliding-window ring cache ({self.slots} slots, window {self.window})")
        for b, n in enumerate(self.host_lengths):
            if n + tn > self.max_len:
                raise ValueError(f"cache overflow: sequence {b} would reach {n + tn} tokens, capacity "
                                 f"{self.max_len}")

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write k, v [B, Tn, Hkv, D] at positions lengths[b] .. lengths[b] + Tn - 1 (lengths unchanged)."""
        self.check_room(k.shape[1] if k.dim() == 4 else 0)
        self.write(k, v)

    def write(self, k: Tensor, v: Tensor) -> None:
        """`append` without the host-side room check: device work only, reads no host state (so it
        can be traced by torch.compile or captured in a CUDA graph). The caller runs
        check_room(Tn) first; an unchecked overflow is a RuntimeError on CPU and dropped on CUDA."""
        kv_cache_append(self.k, self.v, k, v, self.lengths, ring=self.ring)

    def attend(self, q: Tensor, sinks: Optional[Tensor] = None, sm_scale: Optional[float] = None
               ) -> Tuple[Tensor, Tensor]:
        """Attention of the Tq tokens just appended (q [B, Tq, Hq, D]) over the cache: (out, lse)."""
        return attention_decode(q, self.k, self.v, self.lengths, sinks, sm_scale=sm_scale, window=self.window,
                                ring=self.ring)

    def advance(self, n: Union[int, Sequence[int]]) -> None:
        """Move the lengths past n new tokens: one count for all sequences or one per sequence."""
        counts = [int(n)] * len(self.host_lengths) if isinstance(n, int) else [int(x) for x in n]
        if len(counts) != len(self.host_lengths) or any(c < 0 for c in counts):
            raise ValueError(f"KVCache.advance: n must be an int >= 0 or {len(self.host_lengths)} counts >= 0, "
                             f"got {n}")
        for b, c in enumerate(counts):
            if self.host_lengths[b] + c > self.max_len:
                raise ValueError(f"cache overflow: sequence {b} would reach {self.host_lengths[b] + c} tokens, "
                                 f"capacity {self.max_len}")
        self.host_lengths = [h + c for h, c in zip(self.host_lengths, counts)]
        if isinstance(n, int):
            self.lengths.add_(n)
        else:
            self.lengths.copy_(torch.tensor(self.host_lengths, dtype=torch.int32))

    def advance_host(self, n: int) -> None:
        """Record on the host that `lengths` was advanced by n for every sequence by device work
        (a compiled or graph-captured step that ran `lengths.add_(n)` after check_room(n))."""
        self.host_lengths = [h + int(n) for h in self.host_lengths]

    def max_rewind(self) -> int:
        """How many tokens rewind() can take back: any number on a plain cache; on a ring, as long as
        the ring still holds the window of the next step's first token (slots - window + 1)."""
        return self.slots - self.window + 1 if self.ring else self.max_len

    def rewind(self, n: int) -> None:
        """Set every sequence back to its first n tokens, which stay cached (the later ones are
        overwritten by the next writes): for a conversation that continues from a shared prefix.
        Needs n <= every sequence's length, and on a ring n >= length - max_rewind()."""
        n = int(n)
        if not 0 <= n <= min(self.host_lengths):
            raise ValueError(f"KVCache.rewind: n must be in [0, {min(self.host_lengths)}] (the shortest sequence), "
                             f"got {n}")
        if max(self.host_lengths) - n > self.max_rewind():
            raise ValueError(f"KVCache.rewind: this sliding-window ring ({self.slots} slots, window {self.window}) "
                             f"can take back at most {self.max_rewind()} tokens, asked for "
                             f"{max(self.host_lengths) - n}")
        self.lengths.fill_(n)
        self.host_lengths = [n] * len(self.host_lengths)

    def reset(self) -> None:
        """Empty every sequence (the stored values are left to be overwritten)."""
        self.lengths.zero_()
        self.host_lengths = [0] * len(self.host_lengths)
