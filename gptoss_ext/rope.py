"""YaRN rotary tables (spec §2.3), computed in float32 exactly as the gpt-oss reference does.

`RotaryEmbedding(...).cos_sin(positions)` returns cos and sin for any positions (decode offsets,
per-sequence positions in a ragged batch), gathered from a table that is built once per device
and grown on demand.
"""
from typing import Dict, Tuple, Union

import torch
from torch import Tensor

from . import reference


def yarn_inv_freq(head_dim: int = 64, rope_theta: float = 150000.0, rope_scaling_factor: float = 32.0,
                  initial_context_length: int = 4096, rope_ntk_alpha: float = 1.0,
                  rope_ntk_beta: float = 32.0) -> Tuple[Tensor, float]:
    """inv_freq [head_dim/2] float32 and the attention concentration (spec §2.3).

    NTK-by-parts: dims below `low` keep 1/freq, dims above `high` get 1/(s*freq), linear blend
    between (no rounding of low/high); concentration = 0.1*ln(s) + 1. rope_scaling_factor == 1
    means plain RoPE (concentration 1). This is table set-up, not a kernel: it is the oracle's
    formula evaluated in float32, step for step as the gpt-oss reference does.
    """
    return reference.yarn_inv_freq(head_dim, rope_theta, rope_scaling_factor, initial_context_length,
                                   rope_ntk_alpha, rope_ntk_beta, dtype=torch.float32)


class RotaryEmbedding:
    """cos/sin tables for one rotary configuration, cached per device.

    cos_sin(positions) with positions an integer tensor [T] or [B, T] returns float32 cos and sin
    of shape [*positions.shape, head_dim/2], scaled by the concentration, on positions' device.
    """

    def __init__(self, head_dim: int = 64, rope_theta: float = 150000.0, rope_scaling_factor: float = 32.0,
                 initial_context_length: int = 4096, rope_ntk_alpha: float = 1.0, rope_ntk_beta: float = 32.0):
        self.head_dim = head_dim
        self.inv_freq, self.concentration = yarn_inv_freq(head_dim, rope_theta, rope_scaling_factor,
                                                          initial_context_length, rope_ntk_alpha, rope_ntk_beta)
        self._tables: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    def table(self, device: Union[str, torch.device], length: int) -> Tuple[Tensor, Tensor]:
        """(cos, sin) tables [L, head_dim/2] float32 on `device` with L >= length: row p holds
        position p. The same tensors are returned until a longer table is asked for."""
        device = torch.device(device)
        have = self._tables.get(device)
        if have is None or have[0].shape[0] < length:
            n = max(length, 2 * have[0].shape[0] if have is not None else 4096)
            t = torch.arange(n, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)  # fp32, as the reference computes it
            have = ((freqs.cos() * self.concentration).to(device), (freqs.sin() * self.concentration).to(device))
            self._tables[device] = have
        return have

    def cos_sin(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("positions must be >= 0")
        length = int(positions.max()) + 1 if positions.numel() else 1
        cos, sin = self.table(positions.device, length)
        return cos[positions], sin[positions]
