"""Pure-PyTorch oracles with exact gpt-oss semantics (spec: /work/shared/spec/gptoss.md).

Every native op is tested against the functions here, so they are written for clarity, not speed.
Rules that hold throughout:

- Each function computes in the dtype stated in its docstring. "Compute dtype" means float64 when
  the input is float64 and float32 otherwise (bf16/fp16/fp32 inputs), unless a function says
  it works in its input dtype.
- Nothing here silently departs from the spec; arguments the spec does not define raise
  ValueError with the argument's name.
- Everything that has a gradient in the model (attention, RMSNorm, RoPE, SwiGLU, routing weights,
  the MoE block) is differentiable by autograd, without in-place updates of tensors that need
  grad, so that autograd through these functions can serve as the gradient oracle.

This module imports only torch and the standard library, so the oracle works without the native
build.
"""
import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "rms_norm",
    "yarn_low_high",
    "yarn_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention",
    "moe_route",
    "swiglu",
    "FP4_VALUES",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "moe_mlp",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- RMSNorm (spec §2.1)

def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim, spec §2.1.

    `y = ((x_c * rsqrt(mean(x_c**2, -1) + eps)) * scale_c).to(x.dtype)` where `_c` is the compute
    dtype: float32 (float64 when x is float64). The scale multiply happens in the compute dtype
    *before* the cast back, as in the reference (T `RMSNorm.forward`). No bias, no mean subtraction.

    x: [..., d] floating; scale: [d] any floating dtype (float32 in gpt-oss). Returns [..., d] in
    x.dtype.
    """
    if x.dim() < 1 or scale.dim() != 1 or scale.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: scale must be [d] with d = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"scale {tuple(scale.shape)}")
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    normed = xc * torch.rsqrt(torch.mean(xc * xc, dim=-1, keepdim=True) + eps)
    return (normed * scale.to(cd)).to(x.dtype)


# ------------------------------------------------------------------- Dense projection (spec §2)

def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T + bias computed in the compute dtype (float32; float64 for float64 x), rounded
    once to x.dtype: the qkv, out, router and unembedding projections. x [..., K], weight [N, K],
    bias [N] or None. Returns [..., N]."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight must be [N, K] with K = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    cd = _compute_dtype(x.dtype)
    y = torch.nn.functional.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    return y.to(x.dtype)


# ---------------------------------------------------------------------- RoPE with YaRN (spec §2.3)

def yarn_low_high(head_dim: int = 64, rope_theta: float = 150000.0, rope_scaling_factor: float = 32.0,
                  initial_context_length: int = 4096, rope_ntk_alpha: float = 1.0,
                  rope_ntk_beta: float = 32.0) -> Tuple[float, float]:
    """The YaRN NTK-by-parts correction range (low, high) as Python floats, spec §2.3.

    `low = d_half * ln(L0 / (rope_ntk_beta * 2*pi)) / ln(theta)`,
    `high = d_half * ln(L0 / (rope_ntk_alpha * 2*pi)) / ln(theta)`, with d_half = head_dim/2 and
    no floor/ceil (HF's `truncate: false`). For gpt-oss: low = 8.0927791155, high = 17.3980245016.

    Raises ValueError unless 0 < low < high < d_half - 1 (the reference asserts this).
    `rope_scaling_factor` does not enter low/high; it is accepted so that one set of keyword
    arguments fits yarn_low_high, yarn_inv_freq and rope_cos_sin.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"yarn: head_dim must be even and > 0, got {head_dim}")
    if rope_theta <= 1.0:
        raise ValueError(f"yarn: rope_theta must be > 1, got {rope_theta}")
    if initial_context_length <= 0 or rope_ntk_alpha <= 0 or rope_ntk_beta <= 0:
        raise ValueError(f"yarn: initial_context_length, rope_ntk_alpha and rope_ntk_beta must be > 0, got "
                         f"{initial_context_length}, {rope_ntk_alpha}, {rope_ntk_beta}")
    d_half = head_dim / 2
    low = d_half * math.log(initial_context_length / (rope_ntk_beta * 2 * math.pi)) / math.log(rope_theta)
    high = d_half * math.log(initial_context_length / (rope_ntk_alpha * 2 * math.pi)) / math.log(rope_theta)
    if not 0 < low < high < d_half - 1:
        raise ValueError(
            f"yarn: need 0 < low < high < head_dim/2 - 1 = {d_half - 1}, got low={low}, high={high} "
            f"(from head_dim={head_dim}, rope_theta={rope_theta}, initial_context_length={initial_context_length}, "
            f"rope_ntk_alpha={rope_ntk_alpha}, rope_ntk_beta={rope_ntk_beta})")
    return low, high


def yarn_inv_freq(head_dim: int = 64, rope_theta: float = 150000.0, rope_scaling_factor: float = 32.0,
                  initial_context_length: int = 4096, rope_ntk_alpha: float = 1.0, rope_ntk_beta: float = 32.0,
                  dtype: torch.dtype = torch.float64) -> Tuple[Tensor, float]:
    """YaRN inverse frequencies [head_dim/2] in `dtype` and the concentration (a float), spec §2.3.

    freq_i = theta^(2i/head_dim); ramp_i = clamp((i - low)/(high - low), 0, 1); mask = 1 - ramp;
    inv_freq = (1/(s*freq))*(1 - mask) + (1/freq)*mask; concentration = 0.1*ln(s) + 1.
    With dtype=torch.float32 this is the reference's float32 computation step for step
    (T `RotaryEmbedding._compute_concentration_and_inv_freq`).

    rope_scaling_factor == 1.0 means no YaRN: plain 1/freq and concentration 1.0. A factor below 1
    is not defined by the spec and raises ValueError.
    """
    if rope_scaling_factor < 1.0:
        raise ValueError(f"yarn_inv_freq: rope_scaling_factor must be >= 1, got {rope_scaling_factor}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"yarn_inv_freq: head_dim must be even and > 0, got {head_dim}")
    freq = rope_theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    if rope_scaling_factor == 1.0:
        return 1.0 / freq, 1.0
    low, high = yarn_low_high(head_dim, rope_theta, rope_scaling_factor, initial_context_length,
                              rope_ntk_alpha, rope_ntk_beta)
    concentration = 0.1 * math.log(rope_scaling_factor) + 1.0
    interpolation = 1.0 / (rope_scaling_factor * freq)
    extrapolation = 1.0 / freq
    ramp = (torch.arange(head_dim // 2, dtype=dtype) - low) / (high - low)
    mask = 1 - ramp.clamp(0, 1)
    return interpolation * (1 - mask) + extrapolation * mask, concentration


def rope_cos_sin(positions: Union[Tensor, Sequence[int]], head_dim: int = 64, rope_theta: float = 150000.0,
                 rope_scaling_factor: float = 32.0, initial_context_length: int = 4096,
                 rope_ntk_alpha: float = 1.0, rope_ntk_beta: float = 32.0,
                 dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """cos and sin tables, each [*positions.shape, head_dim/2] in `dtype`, spec §2.3.

    `cos = cos(pos * inv_freq) * concentration`, `sin = sin(pos * inv_freq) * concentration`
    (both multiplied by the YaRN concentration). positions: integer (or float) tensor of absolute
    positions, any shape, e.g. [T] or [B, T]; the result is on positions' device.
    """
    positions = torch.as_tensor(positions)
    inv_freq, concentration = yarn_inv_freq(head_dim, rope_theta, rope_scaling_factor, initial_context_length,
                                            rope_ntk_alpha, rope_ntk_beta, dtype=dtype)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.cos(angles) * concentration, torch.sin(angles) * concentration


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split (NeoX, "rotate_half") rotary embedding, spec §2.3 and §6.2 #9.

    Pairs are (i, i + D/2): with x1 = x[..., :D/2], x2 = x[..., D/2:],
    `o1 = x1*cos - x2*sin`, `o2 = x2*cos + x1*sin`, out = cat(o1, o2).

    x: [B, T, H, D] or [T, H, D]; cos, sin: [T, D/2] (shared over the batch) or [B, T, D/2]
    (x 4-D only). Computed in float32 (float64 when x is float64); returns x's shape and dtype.
    """
    if x.dim() not in (3, 4) or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [B, T, H, D] or [T, H, D] with even D, got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")
    half = x.shape[-1] // 2
    t = x.shape[-3]
    ok = (cos.dim() == 2 and tuple(cos.shape) == (t, half)) or \
         (cos.dim() == 3 and x.dim() == 4 and tuple(cos.shape) == (x.shape[0], t, half))
    if not ok:
        raise ValueError(f"apply_rope: cos/sin must be [T, D/2] = [{t}, {half}] or (for 4-D x) "
                         f"[B, T, D/2]; got {tuple(cos.shape)} for x {tuple(x.shape)}")
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    c = cos.to(cd).unsqueeze(-2)  # broadcast over heads
    s = sin.to(cd).unsqueeze(-2)
    x1, x2 = xc[..., :half], xc[..., half:]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


# ------------------------------------------------------------------------- Attention (spec §2.2)

def attention(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor] = None, sm_scale: Optional[float] = None,
              window: int = 0, q_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Grouped-query causal attention with an optional sliding window and learned sinks, spec §2.2.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq % Hkv == 0. Query head h uses KV head
    h // (Hq // Hkv) (spec §2.2 step 2). Query i sits at absolute position q_offset + i; key j is
    at position j. Query i sees key j iff j <= q_offset + i and (window == 0 or
    j > q_offset + i - window), i.e. `window` keys including itself (spec §2.2 step 4).

    logits = (q . k) * sm_scale (default 1/sqrt(D)). sinks: [Hq] raw logits in post-scale units,
    one per query head, appended as one extra softmax column and then dropped, so each row's
    probabilities over keys sum to 1 - p_sink.

    Computed in float64 when q is float64, else float32. Returns
    out [B, Tq, Hq, D] in q.dtype and lse [B, Hq, Tq] in the compute dtype: the natural-log
    log-sum-exp of the row's logits including the sink column.
    A row with no visible key gives out = 0 and lse = sink (or -inf without sinks), never NaN,
    with finite gradients. Differentiable in q, k, v and sinks.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D [B, T, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k and v must be [B={b}, Tk, Hkv, D={d}] and equal; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    tk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: Hq={hq} must be a multiple of Hkv={hkv}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = full causal), got {window}")
    if q_offset < 0:
        raise ValueError(f"attention: q_offset must be >= 0, got {q_offset}")
    if sinks is not None and tuple(sinks.shape) != (hq,):
        raise ValueError(f"attention: sinks must be [Hq={hq}], got {tuple(sinks.shape)}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)

    cd = _compute_dtype(q.dtype)
    group = hq // hkv
    qc = q.to(cd)
    kc = k.to(cd).repeat_interleave(group, dim=2)  # [B, Tk, Hq, D]; head h -> kv head h // group
    vc = v.to(cd).repeat_interleave(group, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * sm_scale  # [B, Hq, Tq, Tk]

    qpos = torch.arange(tq, device=q.device).unsqueeze(1) + q_offset  # [Tq, 1]
    kpos = torch.arange(tk, device=q.device).unsqueeze(0)  # [1, Tk]
    visible = kpos <= qpos
    if window > 0:
        visible = visible & (kpos > qpos - window)
    logits = logits.masked_fill(~visible, float("-inf"))  # out of place; masked entries get zero grad

    if sinks is not None:
        sink_col = sinks.to(cd).view(1, hq, 1, 1).expand(b, hq, tq, 1)
        logits = torch.cat((logits, sink_col), dim=-1)  # [B, Hq, Tq, Tk + 1]

    # Softmax with an explicit guard for rows whose every column is -inf (no visible key, no sink).
    # The shift by the row max is detached: it cancels exactly in both the value and the gradient.
    if logits.shape[-1] > 0:
        row_max = logits.detach().amax(dim=-1, keepdim=True)
    else:
        row_max = logits.new_full((b, hq, tq, 1), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(logits - row_max)  # masked columns: exp(-inf) = 0, gradient 0
    denom = expd.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    probs = expd / safe_denom  # all zero on empty rows
    lse = torch.where(nonempty, row_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))

    out = torch.einsum("bhqk,bkhd->bqhd", probs[..., :tk], vc)  # the sink column is dropped
    return out.to(q.dtype), lse.squeeze(-1)


# ---------------------------------------------------------------------- MoE pieces (spec §2.4)

def moe_route(router_logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k, then softmax over the k selected logits, spec §2.4 step 3 and §6.2 #2, #12.

    router_logits: [T, E]. The k largest logits per token, in descending order, with ties broken
    by the lower expert index (a stable descending sort, not torch.topk, whose tie order is
    unspecified; this matches the Metal top-k kernel). Returns weights [T, k] (softmax of the
    selected logits, float32, or float64 for float64 input; sums to 1 per token) and
    experts [T, k] int32. Differentiable in router_logits.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be [T, E], got {tuple(router_logits.shape)}")
    n_experts = router_logits.shape[1]
    if not 1 <= k <= n_experts:
        raise ValueError(f"moe_route: need 1 <= k <= E={n_experts}, got k={k}")
    cd = _compute_dtype(router_logits.dtype)
    values, order = torch.sort(router_logits.to(cd), dim=-1, descending=True, stable=True)
    weights = torch.softmax(values[:, :k], dim=-1)
    return weights, order[:, :k].to(torch.int32)


def swiglu(h: Tensor, alpha: float = 1.702, limit: Optional[float] = 7.0) -> Tensor:
    """gpt-oss clamped SwiGLU on interleaved columns, spec §2.4 step 4 and §6.2 #1.

    h: [..., 2I]. glu = h[..., 0::2] (even columns), lin = h[..., 1::2] (odd columns);
    glu = min(glu, limit) (clamped above only); lin = clamp(lin, -limit, limit);
    out = glu * sigmoid(alpha * glu) * (lin + 1). Returns [..., I], computed in h.dtype.
    limit=None disables both clamps (transformers 4.55's fused MXFP4 path, spec §6.2 #7; not the
    reference behaviour).
    """
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even (interleaved glu/linear pairs), got {h.shape[-1]}")
    glu, lin = h[..., 0::2], h[..., 1::2]
    if limit is not None:
        glu = glu.clamp(max=limit)
        lin = lin.clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(alpha * glu) * (lin + 1)


# -------------------------------------------------------------------------------- MXFP4 (spec §3.2)

#: The 16 E2M1 values indexed by nibble (bit 3 sign, bits 2-1 exponent with bias 1, bit 0 mantissa;
#: exponent 0 is subnormal), spec §3.2 / W `FP4_VALUES`.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@lru_cache(maxsize=None)
def _pow2_list(lo: int, hi: int) -> Tuple[float, ...]:
    """(2^lo, ..., 2^hi) as exact Python floats."""
    return tuple(math.ldexp(1.0, e) for e in range(lo, hi + 1))


def mxfp4_dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Decode MXFP4 (E2M1 values, one E8M0 scale per 32 elements), spec §3.2.

    blocks: [..., G, 16] uint8, two E2M1 nibbles per byte, low nibble = even element 2j, high
    nibble = odd element 2j+1. scales: [..., G] uint8, E8M0 with bias 127.
    Element value = FP4_VALUES[nibble] * 2^(scale - 127). Returns [..., 32*G] in `dtype`.

    The value is formed exactly (in float64 for a float64 result, else in float32: every
    FP4 value times a power of two from 2^-127 up is exact there), then rounded once to `dtype`.
    Values beyond float32's range (scale >= 253 with large nibbles) become inf for non-float64
    dtypes, as they would in bf16. Scale byte 255 gets no special NaN handling (as in the
    reference): it means 2^128, so nibble 0 gives 0 and e.g. 0.5 gives 2^127.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4_dequantize: blocks and scales must be uint8, got {blocks.dtype}, {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4_dequantize: blocks must be [..., G, 16] and scales [..., G]; got "
                         f"{tuple(blocks.shape)}, {tuple(scales.shape)}")
    cd = _compute_dtype(dtype)
    # Twice the FP4 values are the integers 0, 1, 2, 3, 4, 6, 8, 12 (with signs); pairing them with
    # 2^(scale - 128) keeps every factor representable in float32, even for scale byte 255.
    lut2 = torch.tensor([2.0 * v for v in FP4_VALUES], dtype=cd, device=blocks.device)
    # byte b -> (2*FP4[b & 0xF], 2*FP4[b >> 4]): the low nibble is element 2j, the high nibble 2j+1
    byte_pairs = torch.stack((lut2.repeat(16), lut2.repeat_interleave(16)), dim=-1)  # [256, 2]
    half_pow2 = torch.tensor(_pow2_list(-128, 127), dtype=cd, device=blocks.device)  # index = scale byte
    # (index_select with int32 indices: the same lookup as byte_pairs[blocks.long()], several times faster)
    values = byte_pairs.index_select(0, blocks.reshape(-1).int()).reshape(*scales.shape, 32)
    factors = half_pow2.index_select(0, scales.reshape(-1).int()).reshape(*scales.shape, 1)
    return (values * factors).reshape(*scales.shape[:-1], 32 * scales.shape[-1]).to(dtype)


# Midpoints between neighbouring E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (magnitude index 0..7),
# each with whether the upper neighbour has an even index (mantissa bit 0).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def mxfp4_quantize(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Encode w [..., N] (N % 32 == 0) as MXFP4 along the last dim, spec §3.2.

    Returns blocks [..., N/32, 16] uint8 (low nibble = even element) and scales [..., N/32]
    uint8 (E8M0, bias 127), such that mxfp4_dequantize(blocks, scales) is, element by element,
    the nearest E2M1 grid point at the block's scale.

    Scale rule: the smallest exponent e with amax <= 6 * 2^e (amax = the block's max |w|), i.e.
    e = ceil(log2(amax / 6)), found exactly from frexp; clamped to [-127, 127] (scale bytes
    0..254; 255 is never produced). An all-zero block gets e = 0 (scale byte 127).
    Rounding: each w / 2^e goes to the nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6}; an exact tie goes
    to the neighbour with mantissa bit 0 (the even nibble), e.g. 0.25 -> 0, 0.75 -> 1, 5 -> 4.
    Magnitudes above 6 (only when e was clamped at 127) saturate to 6. Values that round to 0
    are encoded as +0 (nibble 0). With this rule, quantizing values that already lie on the grid
    at some scale reproduces them exactly (the chosen scale is never larger than the original).

    Computed in float64 for float64 input, else float32 (exact: only divisions by powers of two
    and comparisons). Raises ValueError for non-finite input. Not differentiable (w is detached).
    """
    if w.dim() < 1 or w.shape[-1] % 32:
        raise ValueError(f"mxfp4_quantize: last dim must be a multiple of 32, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"mxfp4_quantize: w must be floating point, got {w.dtype}")
    cd = _compute_dtype(w.dtype)
    wb = w.detach().to(cd).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    if not bool(torch.isfinite(wb).all()):
        raise ValueError("mxfp4_quantize: w must be finite")

    amax = wb.abs().amax(dim=-1)
    # amax = m * 2^ex with m in [0.5, 1); 6 * 2^e = 0.75 * 2^(e + 3), so the smallest e with
    # amax <= 6 * 2^e is ex - 3 when m <= 0.75 and ex - 2 otherwise.
    mant, ex = torch.frexp(amax)
    exponent = torch.where(mant <= 0.75, ex - 3, ex - 2)
    exponent = torch.where(amax == 0, torch.zeros_like(exponent), exponent).clamp(-127, 127)
    scales = (exponent + 127).to(torch.uint8)

    pow2 = torch.tensor(_pow2_list(-127, 127), dtype=cd, device=w.device)  # 2^e at index e + 127
    y = wb / pow2[(exponent + 127).long()].unsqueeze(-1)
    mag = y.abs()
    index = torch.zeros(mag.shape, dtype=torch.uint8, device=w.device)
    for mid, upper_is_even in _E2M1_MIDPOINTS:
        passed = (mag >= mid) if upper_is_even else (mag > mid)
        index = index + passed.to(torch.uint8)
    nibbles = index + 8 * ((y < 0) & (index > 0)).to(torch.uint8)  # bit 3 = sign
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., G, 16]
    return blocks, scales


# ---------------------------------------------------------------------------- MoE block (spec §2.4)

_Weight = Union[Tensor, Tuple[Tensor, Tensor]]


def _expert_weight(weight: _Weight, e: int, dtype: torch.dtype) -> Tensor:
    """Expert e's dense [out, in] weight in `dtype`, dequantizing an MXFP4 (blocks, scales) pair."""
    if isinstance(weight, (tuple, list)):
        blocks, scales = weight
        return mxfp4_dequantize(blocks[e], scales[e], dtype=dtype)
    return weight[e].to(dtype)


def _weight_shape(weight: _Weight) -> Tuple[int, ...]:
    """Logical [E, out, in] shape of a dense weight or an MXFP4 (blocks, scales) pair."""
    if isinstance(weight, (tuple, list)):
        if len(weight) != 2:
            raise ValueError("moe_mlp: an MXFP4 weight must be a (blocks, scales) pair")
        blocks, scales = weight
        if blocks.dim() != 4 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"moe_mlp: MXFP4 blocks must be [E, out, G, 16] and scales [E, out, G]; got "
                             f"{tuple(blocks.shape)}, {tuple(scales.shape)}")
        return (blocks.shape[0], blocks.shape[1], 32 * blocks.shape[2])
    if weight.dim() != 3:
        raise ValueError(f"moe_mlp: expert weights must be [E, out, in], got {tuple(weight.shape)}")
    return tuple(weight.shape)


def moe_mlp(x: Tensor, gate_weight: Tensor, gate_bias: Tensor, mlp1_weight: _Weight, mlp1_bias: Tensor,
            mlp2_weight: _Weight, mlp2_bias: Tensor, k: int = 4, alpha: float = 1.702,
            limit: Optional[float] = 7.0) -> Tensor:
    """The gpt-oss MoE block (after its RMSNorm, before the residual), spec §2.4.

    x: [T, d]; gate_weight [E, d], gate_bias [E]; mlp1_weight [E, 2I, d], mlp1_bias [E, 2I];
    mlp2_weight [E, d, I], mlp2_bias [E, d]. mlp1_weight / mlp2_weight may instead be MXFP4
    (blocks [E, out, in/32, 16], scales [E, out, in/32]) pairs, dequantized (per expert) to x.dtype.

    g = x @ gate_weight^T + gate_bias; (w, experts) = moe_route(g, k); for each selected expert e:
    h = W1_e t + b1_e, a = swiglu(h, alpha, limit), y_e = W2_e a + b2_e; out = sum_j w_j * y_{e_j}
    (the routing weight multiplies b2 too). Everything is computed in x.dtype (the routing weights
    are cast to it). Returns [T, d] in x.dtype. Differentiable in x and all dense weights and biases.
    Loops over experts and gathers each expert's tokens, so no [T, k, 2I, d] weight copies are made.
    """
    if x.dim() != 2:
        raise ValueError(f"moe_mlp: x must be [T, d], got {tuple(x.shape)}")
    n_tokens, d = x.shape
    n_experts = gate_weight.shape[0]
    if tuple(gate_weight.shape) != (n_experts, d) or tuple(gate_bias.shape) != (n_experts,):
        raise ValueError(f"moe_mlp: gate_weight must be [E, d={d}] and gate_bias [E]; got "
                         f"{tuple(gate_weight.shape)}, {tuple(gate_bias.shape)}")
    e1, two_i, d1 = _weight_shape(mlp1_weight)
    e2, d2, inter = _weight_shape(mlp2_weight)
    if e1 != n_experts or d1 != d or two_i % 2 or tuple(mlp1_bias.shape) != (n_experts, two_i):
        raise ValueError(f"moe_mlp: mlp1 must be [E={n_experts}, 2I, d={d}] with bias [E, 2I]; got "
                         f"{(e1, two_i, d1)}, bias {tuple(mlp1_bias.shape)}")
    if e2 != n_experts or d2 != d or inter != two_i // 2 or tuple(mlp2_bias.shape) != (n_experts, d):
        raise ValueError(f"moe_mlp: mlp2 must be [E={n_experts}, d={d}, I={two_i // 2}] with bias [E, d]; got "
                         f"{(e2, d2, inter)}, bias {tuple(mlp2_bias.shape)}")

    dtype = x.dtype
    router_logits = x @ gate_weight.to(dtype).t() + gate_bias.to(dtype)
    weights, experts = moe_route(router_logits, k)
    weights = weights.to(dtype)

    out = torch.zeros_like(x)
    for e in range(n_experts):
        token_idx, slot = torch.nonzero(experts == e, as_tuple=True)  # each token picks e at most once
        if token_idx.numel() == 0:
            continue
        t = x[token_idx]
        h = t @ _expert_weight(mlp1_weight, e, dtype).t() + mlp1_bias[e].to(dtype)
        a = swiglu(h, alpha=alpha, limit=limit)
        y = a @ _expert_weight(mlp2_weight, e, dtype).t() + mlp2_bias[e].to(dtype)
        out = out.index_add(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1))
    return out
