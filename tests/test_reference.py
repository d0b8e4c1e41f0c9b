"""Tests of the pure-PyTorch oracle (gptoss_ext/reference.py) against the spec's numbers and
properties (/work/shared/spec/gptoss.md). The module is loaded from its file so that these tests
never depend on the native build."""
import importlib.util
import math
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gptoss_reference", pathlib.Path(__file__).resolve().parents[1] / "gptoss_ext" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).to(dtype)


# ------------------------------------------------------------------------------------------ YaRN

SPEC_INV_FREQ = {0: 1.0, 1: 6.890443e-1, 2: 4.747820e-1, 3: 3.271458e-1, 4: 2.254180e-1, 5: 1.553230e-1,
                 6: 1.070244e-1, 7: 7.374457e-2, 8: 5.081328e-2, 9: 3.170570e-2, 10: 1.933500e-2,
                 11: 1.159205e-2, 12: 6.794959e-3, 13: 3.860359e-3, 14: 2.093793e-3, 15: 1.052602e-3,
                 16: 4.564839e-4, 17: 1.293187e-4, 18: 3.830881e-5, 31: 3.023511e-7}


def test_yarn_low_high_concentration():
    low, high = reference.yarn_low_high()
    assert low == pytest.approx(8.0927791155, rel=1e-9)
    assert high == pytest.approx(17.3980245016, rel=1e-9)
    for dtype in (torch.float32, F64):
        inv_freq, conc = reference.yarn_inv_freq(dtype=dtype)
        assert inv_freq.shape == (32,) and inv_freq.dtype == dtype
        assert conc == pytest.approx(1.34657359028, rel=1e-9)
        assert conc ** 2 == pytest.approx(1.81326043, rel=1e-8)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (F64, 1e-5)])
def test_yarn_inv_freq_table(dtype, rel):
    inv_freq, _ = reference.yarn_inv_freq(dtype=dtype)
    for i, want in SPEC_INV_FREQ.items():
        assert float(inv_freq[i]) == pytest.approx(want, rel=rel), i


def test_yarn_inv_freq_parts():
    inv_freq, _ = reference.yarn_inv_freq(dtype=F64)
    freq = 150000.0 ** (torch.arange(0, 64, 2, dtype=F64) / 64)
    # dims i <= 8 keep the original frequency, dims i >= 18 are divided by s = 32, 9..17 blended
    torch.testing.assert_close(inv_freq[:9], 1 / freq[:9], rtol=1e-15, atol=0)
    torch.testing.assert_close(inv_freq[18:], 1 / (32 * freq[18:]), rtol=1e-15, atol=0)
    low, high = reference.yarn_low_high()
    ramp = (torch.arange(9, 18, dtype=F64) - low) / (high - low)
    blend = (1 / (32 * freq[9:18])) * ramp + (1 / freq[9:18]) * (1 - ramp)
    torch.testing.assert_close(inv_freq[9:18], blend, rtol=1e-14, atol=0)
    # float32 result follows the float64 one closely
    inv32, _ = reference.yarn_inv_freq(dtype=torch.float32)
    torch.testing.assert_close(inv32.double(), inv_freq, rtol=3e-6, atol=0)


def test_yarn_no_scaling_and_errors():
    inv_freq, conc = reference.yarn_inv_freq(rope_scaling_factor=1.0, dtype=F64)
    assert conc == 1.0
    torch.testing.assert_close(inv_freq, 1 / 150000.0 ** (torch.arange(0, 64, 2, dtype=F64) / 64))
    with pytest.raises(ValueError, match="rope_ntk"):
        reference.yarn_low_high(rope_ntk_alpha=32.0, rope_ntk_beta=1.0)  # low > high
    with pytest.raises(ValueError, match="initial_context_length"):
        reference.yarn_inv_freq(initial_context_length=64)  # low < 0
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        reference.yarn_inv_freq(rope_scaling_factor=0.5)


# ------------------------------------------------------------------------------------------ RoPE

def test_rope_cos_sin():
    pos = torch.tensor([[0, 1, 7, 4095], [131071, 3, 2, 1]])
    cos, sin = reference.rope_cos_sin(pos)
    assert cos.shape == sin.shape == (2, 4, 32) and cos.dtype == F64
    inv_freq, conc = reference.yarn_inv_freq(dtype=F64)
    ang = pos.double()[..., None] * inv_freq
    torch.testing.assert_close(cos, torch.cos(ang) * conc, rtol=0, atol=0)
    torch.testing.assert_close(sin, torch.sin(ang) * conc, rtol=0, atol=0)
    assert torch.all(cos[0, 0] == conc) and torch.all(sin[0, 0] == 0)
    cos32, sin32 = reference.rope_cos_sin(torch.arange(10), dtype=torch.float32)
    assert cos32.dtype == sin32.dtype == torch.float32
    cos64, sin64 = reference.rope_cos_sin(torch.arange(10))
    torch.testing.assert_close(cos32.double(), cos64, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin32.double(), sin64, rtol=0, atol=1e-6)


def _rope_explicit(x, cos, sin):
    """Per-pair complex rotation: (x_i + i x_{i+D/2}) * (cos + i sin)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    rot = z * torch.complex(cos.double(), sin.double()).unsqueeze(-2)
    return torch.cat((rot.real, rot.imag), dim=-1)


def test_apply_rope_pairs_and_shapes():
    b, t, h, d = 2, 5, 3, 64
    x = randn(b, t, h, d, seed=1)
    cos, sin = reference.rope_cos_sin(torch.arange(7, 7 + t))
    out = reference.apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, _rope_explicit(x, cos, sin), rtol=1e-13, atol=1e-13)
    # 3-D x with a [T, D/2] table
    torch.testing.assert_close(reference.apply_rope(x[1], cos, sin), out[1], rtol=0, atol=0)
    # per-sequence positions [B, T, D/2]
    pos = torch.tensor([[0, 1, 2, 3, 4], [100, 101, 102, 103, 104]])
    cb, sb = reference.rope_cos_sin(pos)
    out_b = reference.apply_rope(x, cb, sb)
    for i in range(b):
        torch.testing.assert_close(out_b[i], reference.apply_rope(x[i], cb[i], sb[i]), rtol=0, atol=0)
    # position 0 only scales by the concentration
    c0, s0 = reference.rope_cos_sin(torch.zeros(t, dtype=torch.long))
    torch.testing.assert_close(reference.apply_rope(x, c0, s0), x * reference.yarn_inv_freq()[1])
    with pytest.raises(ValueError):
        reference.apply_rope(x, cos[:, :16], sin[:, :16])
    with pytest.raises(ValueError):
        reference.apply_rope(x[0], cb, sb)


def test_apply_rope_relative_positions():
    # q.k after RoPE depends only on the relative position (times concentration^2)
    q = randn(1, 1, 1, 64, seed=2)
    k = randn(1, 1, 1, 64, seed=3)

    def score(pq, pk):
        cq, sq = reference.rope_cos_sin(torch.tensor([pq]))
        ck, sk = reference.rope_cos_sin(torch.tensor([pk]))
        return float((reference.apply_rope(q, cq, sq) * reference.apply_rope(k, ck, sk)).sum())

    base = score(10, 3)
    assert score(1010, 1003) == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert score(70000, 69993) == pytest.approx(base, rel=1e-7, abs=1e-7)
    conc = reference.yarn_inv_freq()[1]
    assert score(5, 5) == pytest.approx(float((q * k).sum()) * conc ** 2, rel=1e-12)


def test_apply_rope_bf16_computes_in_fp32():
    x = randn(4, 2, 64, seed=4, dtype=torch.bfloat16)
    cos, sin = reference.rope_cos_sin(torch.arange(4), dtype=torch.float32)
    out = reference.apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    xf = x.float()
    want = torch.cat((xf[..., :32] * cos[:, None] - xf[..., 32:] * sin[:, None],
                      xf[..., 32:] * cos[:, None] + xf[..., :32] * sin[:, None]), -1).bfloat16()
    assert torch.equal(out, want)


# --------------------------------------------------------------------------------------- RMSNorm

def test_rms_norm_float64():
    x = randn(3, 7, 2880, seed=5, scale=3.0)
    scale = randn(2880, seed=6)
    out = reference.rms_norm(x, scale)
    assert out.dtype == F64
    want = torch.empty_like(x)
    for i in range(3):
        for j in range(7):
            row = x[i, j]
            vals = row.tolist()
            rms = math.sqrt(math.fsum(v * v for v in vals) / len(vals) + 1e-5)
            want[i, j] = torch.tensor([v / rms * float(s) for v, s in zip(vals, scale)], dtype=F64)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)


def test_rms_norm_bf16_scale_multiply_in_fp32():
    x = randn(4, 2880, seed=7, dtype=torch.bfloat16, scale=2.0)
    scale = randn(2880, seed=8, dtype=torch.bfloat16)  # checkpoint scales are bf16, used in fp32
    out = reference.rms_norm(x, scale)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    xf = x.float()
    normed = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-5)
    want = (normed * scale.float()).bfloat16()
    assert torch.equal(out, want)
    # the variant that casts before the scale multiply is distinguishable, so the test has teeth
    cast_first = (normed.bfloat16().float() * scale.float()).bfloat16()
    assert not torch.equal(out, cast_first)
    # float32 input stays float32 and matches the float64 computation
    out32 = reference.rms_norm(x.float(), scale.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference.rms_norm(x.double(), scale.double()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        reference.rms_norm(x, scale[:100])


# ------------------------------------------------------------------------------------- Attention

def _attention_loop(q, k, v, sinks, sm_scale, window, q_offset):
    """Row-by-row float64 attention with the sink as an extra column."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.zeros(b, tq, hq, d, dtype=F64)
    lse = torch.full((b, hq, tq), float("-inf"), dtype=F64)
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                pos = q_offset + i
                keys = [j for j in range(tk) if j <= pos and (window == 0 or j > pos - window)]
                logits = [float(q[bi, i, h].double() @ k[bi, j, h // group].double()) * sm_scale for j in keys]
                cols = logits + ([float(sinks[h])] if sinks is not None else [])
                if not cols:
                    continue
                m = max(cols)
                z = sum(math.exp(c - m) for c in cols)
                lse[bi, h, i] = m + math.log(z)
                for j, l in zip(keys, logits):
                    out[bi, i, h] += math.exp(l - lse[bi, h, i]) * v[bi, j, h // group].double()
    return out, lse


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("window,q_offset,tq,tk", [(0, 0, 6, 6), (3, 0, 7, 7), (0, 4, 3, 7), (3, 4, 5, 9),
                                                   (2, 5, 4, 6)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_matches_loop(hq, hkv, window, q_offset, tq, tk, with_sinks):
    seed = hq * 1000 + hkv * 100 + window * 10 + q_offset
    q = randn(2, tq, hq, 8, seed=seed)
    k = randn(2, tk, hkv, 8, seed=seed + 1)
    v = randn(2, tk, hkv, 8, seed=seed + 2)
    sinks = randn(hq, seed=seed + 3) if with_sinks else None
    out, lse = reference.attention(q, k, v, sinks=sinks, window=window, q_offset=q_offset)
    assert out.shape == q.shape and out.dtype == F64 and lse.shape == (2, hq, tq) and lse.dtype == F64
    want_out, want_lse = _attention_loop(q, k, v, sinks, 1 / math.sqrt(8), window, q_offset)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_attention_matches_torch_sdpa_causal_gqa():
    q = randn(2, 9, 8, 16, seed=20)
    k = randn(2, 9, 2, 16, seed=21)
    v = randn(2, 9, 2, 16, seed=22)
    out, _ = reference.attention(q, k, v, sm_scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_attention_window_keeps_exactly_window_keys():
    # v = one-hot of the key index: out[..., j] is the probability of key j
    tk = 300
    q = randn(1, tk, 1, tk, seed=23, scale=0.01)
    k = randn(1, tk, 1, tk, seed=24, scale=0.01)
    v = torch.eye(tk, dtype=F64).view(1, tk, 1, tk)
    out, _ = reference.attention(q, k, v, window=128)
    seen = out[0, :, 0] > 0
    assert torch.equal(seen.sum(-1), torch.clamp(torch.arange(1, tk + 1), max=128))
    assert bool(seen[200, 73:201].all()) and not bool(seen[200, 72]) and not bool(seen[200, 201])


def test_attention_rows_sum_with_sink():
    q = randn(2, 6, 4, 8, seed=30)
    k = randn(2, 10, 2, 8, seed=31)
    sinks = randn(4, seed=32, scale=2.0)
    ones = torch.ones(2, 10, 2, 8, dtype=F64)
    for window, q_offset in [(0, 4), (3, 2), (0, 0)]:
        out, lse = reference.attention(q, k, ones, sinks=sinks, window=window, q_offset=q_offset)
        p_sink = torch.exp(sinks.view(1, 4, 1) - lse)  # [B, Hq, Tq]
        torch.testing.assert_close(out, (1 - p_sink).transpose(1, 2).unsqueeze(-1).expand_as(out),
                                   rtol=1e-12, atol=1e-12)
        assert bool((p_sink > 0).all()) and bool((p_sink < 1).all())


def _empty_row_case(seed, with_sinks):
    # window 3, keys 0..5, queries at positions 4..9: positions 8 and 9 see no key (6, 7, 8 >= Tk)
    q = randn(2, 6, 4, 8, seed=seed).requires_grad_()
    k = randn(2, 6, 2, 8, seed=seed + 1).requires_grad_()
    v = randn(2, 6, 2, 8, seed=seed + 2).requires_grad_()
    sinks = randn(4, seed=seed + 3).requires_grad_() if with_sinks else None
    return q, k, v, sinks, dict(window=3, q_offset=4)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_empty_rows(with_sinks):
    q, k, v, sinks, kw = _empty_row_case(40, with_sinks)
    out, lse = reference.attention(q, k, v, sinks=sinks, **kw)
    assert not bool(torch.isnan(out).any()) and not bool(torch.isnan(lse).any())
    assert bool((out[:, 4:] == 0).all()) and bool((out[:, :4] != 0).all())
    if with_sinks:
        assert torch.equal(lse[:, :, 4:], sinks.detach().view(1, 4, 1).expand(2, 4, 2))
    else:
        assert bool(torch.isneginf(lse[:, :, 4:]).all()) and bool(torch.isfinite(lse[:, :, :4]).all())
    # gradients through out and through the finite part of lse are finite everywhere
    w_out = randn(*out.shape, seed=41)
    w_lse = randn(*lse.shape, seed=42)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * w_out).sum() + (finite_lse * w_lse).sum()
    inputs = [t for t in (q, k, v, sinks) if t is not None]
    grads = torch.autograd.grad(loss, inputs, retain_graph=True)
    for g in grads:
        assert bool(torch.isfinite(g).all())
    assert bool((grads[0][:, 4:] == 0).all())  # empty query rows get no q gradient
    # gradients through out alone are also finite (lse's where() must not leak NaN)
    for g in torch.autograd.grad((out * w_out).sum(), inputs):
        assert bool(torch.isfinite(g).all())


def test_attention_gradcheck_with_sinks_and_empty_rows():
    q, k, v, sinks, kw = _empty_row_case(50, True)
    q, k, v = q[:1, :, :2], k[:1, :, :1], v[:1, :, :1]
    sinks = sinks[:2]
    q, k, v, sinks = (t.detach().requires_grad_() for t in (q, k, v, sinks))
    assert torch.autograd.gradcheck(lambda *a: reference.attention(*a, **kw), (q, k, v, sinks))


def test_attention_gradcheck_no_sinks():
    q = randn(1, 4, 2, 4, seed=60).requires_grad_()
    k = randn(1, 6, 1, 4, seed=61).requires_grad_()
    v = randn(1, 6, 1, 4, seed=62).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: reference.attention(*a, window=3, q_offset=2), (q, k, v))


def test_attention_sink_gradient_formula():
    # kernel-anchors §1.1: dsink_h = -sum_rows p_sink * rowsum(dO * O)
    q = randn(2, 5, 4, 8, seed=70)
    k = randn(2, 7, 2, 8, seed=71)
    v = randn(2, 7, 2, 8, seed=72)
    sinks = randn(4, seed=73).requires_grad_()
    out, lse = reference.attention(q, k, v, sinks=sinks, window=4, q_offset=2)
    d_out = randn(*out.shape, seed=74)
    (ds,) = torch.autograd.grad((out * d_out).sum(), sinks)
    p_sink = torch.exp(sinks.detach().view(1, 4, 1) - lse.detach())  # [B, Hq, Tq]
    rowdot = (d_out * out.detach()).sum(-1).transpose(1, 2)  # [B, Hq, Tq]
    torch.testing.assert_close(ds, -(p_sink * rowdot).sum((0, 2)), rtol=1e-12, atol=1e-12)


def test_attention_large_sink_and_low_precision():
    q = randn(1, 4, 2, 8, seed=80)
    k = randn(1, 4, 1, 8, seed=81)
    v = randn(1, 4, 1, 8, seed=82)
    out, lse = reference.attention(q, k, v, sinks=torch.tensor([1e4, -1e4], dtype=F64))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert float(out[..., 0, :].abs().max()) == 0.0 and torch.equal(lse[0, 0], torch.full((4,), 1e4, dtype=F64))
    plain, plain_lse = reference.attention(q, k, v)
    torch.testing.assert_close(out[..., 1, :], plain[..., 1, :], rtol=0, atol=0)
    torch.testing.assert_close(lse[0, 1], plain_lse[0, 1], rtol=0, atol=0)
    sinks = randn(2, seed=83)
    out16, lse16 = reference.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks=sinks.bfloat16())
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    ref, ref_lse = reference.attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(),
                                       sinks=sinks.bfloat16().double())
    torch.testing.assert_close(out16.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse16.double(), ref_lse, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        reference.attention(q, k, v, q_offset=-1)
    with pytest.raises(ValueError):
        reference.attention(q, k, v, sinks=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        reference.attention(randn(1, 4, 3, 8, seed=84), k.expand(1, 4, 2, 8), v.expand(1, 4, 2, 8))


# --------------------------------------------------------------------------------------- Routing

def test_moe_route_ties_prefer_lower_index():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                           [0.5, 2.0, 0.5, 2.0, 2.0, 0.5],
                           [3.0, -1.0, 3.0, 3.0, -1.0, -1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    weights, experts = reference.moe_route(logits, 4)
    assert experts.dtype == torch.int32 and weights.dtype == torch.float32
    assert experts.tolist() == [[0, 1, 2, 3], [1, 3, 4, 0], [0, 2, 3, 1], [0, 1, 2, 3]]
    torch.testing.assert_close(weights[0], torch.full((4,), 0.25))
    torch.testing.assert_close(weights[3], torch.full((4,), 0.25))
    # bf16 ties (distinct fp32 values that round together) are ties too
    b16 = torch.tensor([[1.0, 1.001, 1.002, 0.0, 1.003]]).bfloat16()
    assert reference.moe_route(b16, 2)[1].tolist() == [[0, 1]]


def test_moe_route_softmax_over_selected_only():
    logits = randn(513, 32, seed=90, dtype=torch.float32)
    weights, experts = reference.moe_route(logits, 4)
    assert weights.shape == experts.shape == (513, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(513), rtol=1e-6, atol=1e-6)
    chosen = torch.gather(logits, 1, experts.long())
    assert bool((chosen[:, :-1] >= chosen[:, 1:]).all())  # descending
    assert torch.equal(chosen[:, 0], logits.max(-1).values)
    kth = chosen[:, -1:]
    assert bool(((logits > kth).sum(-1) <= 3).all())  # nothing outside beats the 4th choice
    torch.testing.assert_close(weights, torch.softmax(chosen, -1), rtol=0, atol=0)
    # lowering the logits that were not chosen changes nothing
    lowered = logits.clone()
    mask = torch.ones_like(logits, dtype=torch.bool).scatter(1, experts.long(), False)
    lowered[mask] -= 5.0
    w2, e2 = reference.moe_route(lowered, 4)
    assert torch.equal(e2, experts) and torch.equal(w2, weights)
    # the weights are not the top-4 of softmax over all experts
    assert not torch.allclose(weights, torch.gather(torch.softmax(logits, -1), 1, experts.long()))
    w64, _ = reference.moe_route(logits.double(), 4)
    assert w64.dtype == F64
    with pytest.raises(ValueError):
        reference.moe_route(logits, 33)


# ---------------------------------------------------------------------------------------- SwiGLU

def test_swiglu_interleave_clamps_and_plus_one():
    # rows of (glu, lin) pairs
    h = torch.tensor([[1.0, 2.0, -3.0, 0.5],      # plain values
                      [9.0, 0.0, -20.0, 0.0],     # glu: upper clamp to 7, no lower clamp
                      [1.0, 9.0, 1.0, -9.0],      # lin: clamped to +-7
                      [0.0, -1.0, 2.0, -1.0]], dtype=F64)  # lin = -1 cancels the "+1": output 0

    def expect(g, l):
        g = min(g, 7.0)
        l = max(min(l, 7.0), -7.0)
        return g / (1 + math.exp(-1.702 * g)) * (l + 1)

    out = reference.swiglu(h)
    assert out.shape == (4, 2)
    want = torch.tensor([[expect(float(r[0]), float(r[1])), expect(float(r[2]), float(r[3]))] for r in h], dtype=F64)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)
    assert float(out[1, 1]) != 0.0  # glu at -20 is not clamped to -7: silu(-20)-ish, tiny but not silu(-7)
    assert float(out[1, 1]) == pytest.approx(-20 / (1 + math.exp(1.702 * 20)), rel=1e-12)
    assert float(out[3, 0]) == 0.0 and float(out[3, 1]) == 0.0
    # random batch against the elementwise formula
    h = randn(3, 5, 64, seed=100, scale=5.0)
    g, l = h[..., 0::2].clamp(max=7.0), h[..., 1::2].clamp(-7.0, 7.0)
    torch.testing.assert_close(reference.swiglu(h), g * torch.sigmoid(1.702 * g) * (l + 1), rtol=0, atol=0)
    assert reference.swiglu(h.float()).dtype == torch.float32
    # limit=None switches the clamps off
    g, l = h[..., 0::2], h[..., 1::2]
    torch.testing.assert_close(reference.swiglu(h, limit=None), g * torch.sigmoid(1.702 * g) * (l + 1))


# ----------------------------------------------------------------------------------------- MXFP4

LUT = torch.tensor(reference.FP4_VALUES, dtype=F64)


def test_fp4_values_table():
    assert reference.FP4_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
    assert math.copysign(1.0, reference.FP4_VALUES[8]) == -1.0
    # sign bit 3, exponent bits 2-1 (bias 1, 0 = subnormal), mantissa bit 0
    for n in range(16):
        sign = -1.0 if n & 8 else 1.0
        exp, man = (n >> 1) & 3, n & 1
        mag = man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1)
        assert reference.FP4_VALUES[n] == sign * mag


def test_mxfp4_dequantize_every_nibble_and_scale():
    scales = torch.arange(255, dtype=torch.uint8).view(255, 1)  # every scale byte 0..254
    j = torch.arange(16)
    byte_row = (j | ((15 - j) << 4)).to(torch.uint8)  # low nibbles 0..15, high nibbles 15..0
    blocks = byte_row.expand(255, 16).reshape(255, 1, 16).contiguous()
    pow2 = torch.tensor([math.ldexp(1.0, s - 127) for s in range(255)], dtype=F64).view(255, 1)
    want = torch.empty(255, 32, dtype=F64)
    want[:, 0::2] = LUT[j] * pow2
    want[:, 1::2] = LUT[15 - j] * pow2
    got64 = reference.mxfp4_dequantize(blocks, scales, dtype=F64)
    assert got64.shape == (255, 32) and got64.dtype == F64
    assert torch.equal(got64, want)
    assert torch.equal(torch.signbit(got64), torch.signbit(want))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = reference.mxfp4_dequantize(blocks, scales, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    # bf16 holds every value exactly where float32 does (spec §3.2)
    fin = torch.isfinite(want.float())
    assert torch.equal(reference.mxfp4_dequantize(blocks, scales)[fin].double(), want[fin])
    # scale byte 255: no NaN handling, 2^128 times the value (0 stays 0)
    b255 = reference.mxfp4_dequantize(blocks[:1], torch.full((1, 1), 255, dtype=torch.uint8), dtype=F64)
    assert float(b255[0, 0]) == 0.0 and float(b255[0, 2]) == math.ldexp(1.0, 127)
    assert not bool(torch.isnan(reference.mxfp4_dequantize(blocks[:1], torch.full((1, 1), 255, dtype=torch.uint8),
                                                           dtype=torch.float32)).any())


def test_mxfp4_nibble_order_and_shapes():
    blocks = torch.zeros(2, 3, 16, dtype=torch.uint8)
    blocks[1, 2, 0] = 0x71  # low nibble 1 (0.5) -> element 0, high nibble 7 (6.0) -> element 1
    blocks[1, 2, 15] = 0xC2  # low 2 (1.0) -> element 30, high 12 (-2.0) -> element 31
    scales = torch.full((2, 3), 128, dtype=torch.uint8)  # x2
    out = reference.mxfp4_dequantize(blocks, scales, dtype=torch.float32)
    assert out.shape == (2, 96)
    assert out[1, 64:66].tolist() == [1.0, 12.0] and out[1, 94:96].tolist() == [2.0, -4.0]
    assert int((out != 0).sum()) == 4
    with pytest.raises(ValueError):
        reference.mxfp4_dequantize(blocks, scales[:, :2])
    with pytest.raises(ValueError):
        reference.mxfp4_dequantize(blocks.int(), scales)


def _random_mxfp4(shape, seed, scale_lo, scale_hi):
    g = gen(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(scale_lo, scale_hi + 1, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype,scale_hi", [(F64, 254), (torch.float32, 252)])
def test_mxfp4_round_trip_grid_values(dtype, scale_hi):
    blocks, scales = _random_mxfp4((64, 8), seed=110, scale_lo=0, scale_hi=scale_hi)
    # include the extremes and blocks whose max is small (re-quantized at a smaller scale)
    scales[0, 0], scales[0, 1] = 0, scale_hi
    blocks[1] = blocks[1] & 0x11  # nibbles 0 or 1 only: block max 0.5
    blocks[2] = blocks[2] & 0x99  # nibbles 0, 1, 8, 9: +-0 and +-0.5
    w = reference.mxfp4_dequantize(blocks, scales, dtype=dtype)
    assert bool(torch.isfinite(w).all())
    b2, s2 = reference.mxfp4_quantize(w)
    assert b2.shape == blocks.shape and s2.shape == scales.shape and b2.dtype == s2.dtype == torch.uint8
    assert torch.equal(reference.mxfp4_dequantize(b2, s2, dtype=dtype), w)
    # blocks whose max magnitude is 6 keep their scale byte
    full = (reference.mxfp4_dequantize(blocks, torch.full_like(scales, 127), dtype=F64)
            .view(64, 8, 32).abs().amax(-1) == 6)
    assert torch.equal(s2[full], scales[full])


def test_mxfp4_quantize_nearest_grid_point():
    g = gen(120)
    w = torch.randn(16, 4, 32, generator=g, dtype=F64)
    w = w * torch.exp2(torch.randint(-20, 21, (16, 4, 1), generator=g).double())  # varied block magnitudes
    w[0, 0] = 0.0
    w[0, 0, 5] = -1e-300  # a block so small that the scale clamps at 2^-127
    w = w.reshape(16, 128)
    blocks, scales = reference.mxfp4_quantize(w)
    assert blocks.shape == (16, 4, 16) and scales.shape == (16, 4)
    dq = reference.mxfp4_dequantize(blocks, scales, dtype=F64).view(16, 4, 32)
    wb = w.view(16, 4, 32)
    step = torch.tensor([math.ldexp(1.0, int(s) - 127) for s in scales.flatten()], dtype=F64).view(16, 4, 1)
    grid = LUT.view(1, 1, 1, 16) * step.unsqueeze(-1)  # [16, 4, 1, 16]
    dist = (wb.unsqueeze(-1) - grid).abs()
    assert torch.equal((dq - wb).abs(), dist.min(-1).values)  # brute force over the 16 values
    # scale: the smallest power of two that fits the block max into [-6, 6]
    amax = wb.abs().amax(-1)
    step = step.squeeze(-1)
    assert bool((amax <= 6 * step).all())
    assert bool(((amax > 3 * step) | (scales == 0)).all())  # a smaller scale would clip the block max
    assert int(scales[0, 0]) == 0  # clamped at the bottom of the E8M0 range
    assert bool((dq[0, 0] == 0).all())
    # float32 input gives the same encoding
    b32, s32 = reference.mxfp4_quantize(w.float())
    dq32 = reference.mxfp4_dequantize(b32, s32, dtype=F64).view(16, 4, 32)
    grid32 = LUT.view(1, 1, 1, 16) * torch.tensor([math.ldexp(1.0, int(s) - 127) for s in s32.flatten()],
                                                  dtype=F64).view(16, 4, 1, 1)
    wf = w.float().double().view(16, 4, 32)
    assert torch.equal((dq32 - wf).abs(), (wf.unsqueeze(-1) - grid32).abs().min(-1).values)


def test_mxfp4_quantize_ties_zero_block_and_errors():
    # exact midpoints at scale 2^0 (block max 6 fixes e = 0): ties go to the even nibble
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.zeros(32, dtype=F64)
    row[0] = 6.0
    row[1:8] = torch.tensor(mids, dtype=F64)
    row[8:15] = -torch.tensor(mids, dtype=F64)
    row[15] = -0.1  # rounds to zero
    blocks, scales = reference.mxfp4_quantize(row.view(1, 32))
    assert scales.tolist() == [[127]]
    dq = reference.mxfp4_dequantize(blocks, scales, dtype=F64)[0]
    assert dq[1:8].tolist() == want and dq[8:15].tolist() == [-x for x in want] and float(dq[15]) == 0.0
    nib = torch.stack((blocks[0] & 0xF, blocks[0] >> 4), -1).flatten()
    assert bool(((nib[1:15] & 1) == 0).all())  # all ties landed on mantissa bit 0
    assert int(nib[15]) == 0  # negative values rounding to zero are encoded as +0
    # all-zero block: scale byte 127, nibbles 0
    zb, zs = reference.mxfp4_quantize(torch.zeros(2, 64))
    assert zs.tolist() == [[127, 127], [127, 127]] and int(zb.sum()) == 0
    # a block max just above 6 * 2^e moves to the next scale
    assert reference.mxfp4_quantize(torch.full((32,), 6.0 * 1.0000001, dtype=F64))[1].tolist() == [128]
    assert reference.mxfp4_quantize(torch.full((32,), 4.0, dtype=F64))[1].tolist() == [127]
    assert reference.mxfp4_quantize(torch.full((32,), 3.0, dtype=F64))[1].tolist() == [126]
    with pytest.raises(ValueError):
        reference.mxfp4_quantize(torch.ones(3, 31))
    with pytest.raises(ValueError):
        reference.mxfp4_quantize(torch.tensor([float("inf")] + [0.0] * 31))


# ------------------------------------------------------------------------------------------- MoE

def _moe_params(n_experts, d, inter, seed, dtype=F64):
    return dict(
        gate_weight=randn(n_experts, d, seed=seed, dtype=dtype),
        gate_bias=randn(n_experts, seed=seed + 1, dtype=dtype),
        mlp1_weight=randn(n_experts, 2 * inter, d, seed=seed + 2, dtype=dtype, scale=0.5),
        mlp1_bias=randn(n_experts, 2 * inter, seed=seed + 3, dtype=dtype),
        mlp2_weight=randn(n_experts, d, inter, seed=seed + 4, dtype=dtype, scale=0.5),
        mlp2_bias=randn(n_experts, d, seed=seed + 5, dtype=dtype),
    )


def _moe_loop(x, p, k, alpha=1.702, limit=7.0):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = p["gate_weight"] @ x[t] + p["gate_bias"]
        order = sorted(range(logits.shape[0]), key=lambda e: (-float(logits[e]), e))[:k]
        sel = torch.stack([logits[e] for e in order])
        w = torch.exp(sel - sel.max())
        w = w / w.sum()
        for j, e in enumerate(order):
            h = p["mlp1_weight"][e] @ x[t] + p["mlp1_bias"][e]
            glu, lin = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            a = glu * torch.sigmoid(alpha * glu) * (lin + 1)
            out[t] += w[j] * (p["mlp2_weight"][e] @ a + p["mlp2_bias"][e])
    return out


def test_moe_mlp_matches_token_loop():
    p = _moe_params(3, 16, 8, seed=130)
    x = randn(11, 16, seed=136, scale=2.0)
    out = reference.moe_mlp(x, **p, k=2)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, _moe_loop(x, p, 2), rtol=1e-12, atol=1e-12)
    # the clamps are exercised (some |h| > 7)
    h = torch.einsum("eod,td->teo", p["mlp1_weight"], x) + p["mlp1_bias"]
    assert bool((h.abs() > 7).any())
    # k = E: every expert, softmax over all of them
    torch.testing.assert_close(reference.moe_mlp(x, **p, k=3), _moe_loop(x, p, 3), rtol=1e-12, atol=1e-12)
    out32 = reference.moe_mlp(x.float(), **{n: t.float() for n, t in p.items()}, k=2)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)


def test_moe_mlp_accepts_mxfp4_weights():
    p = _moe_params(3, 64, 32, seed=140)
    q1 = reference.mxfp4_quantize(p["mlp1_weight"])
    q2 = reference.mxfp4_quantize(p["mlp2_weight"])
    assert q1[0].shape == (3, 64, 2, 16) and q2[0].shape == (3, 64, 1, 16)
    x = randn(9, 64, seed=146)
    quantized = dict(p, mlp1_weight=q1, mlp2_weight=q2)
    dense = dict(p, mlp1_weight=reference.mxfp4_dequantize(*q1, dtype=F64),
                 mlp2_weight=reference.mxfp4_dequantize(*q2, dtype=F64))
    out = reference.moe_mlp(x, **quantized, k=2)
    assert torch.equal(out, reference.moe_mlp(x, **dense, k=2))
    torch.testing.assert_close(out, _moe_loop(x, dense, 2), rtol=1e-12, atol=1e-12)
    out32 = reference.moe_mlp(x.float(), **{n: (t.float() if isinstance(t, torch.Tensor) else t)
                                            for n, t in quantized.items()}, k=2)
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        reference.moe_mlp(x, **dict(p, mlp2_weight=q1), k=2)


def test_moe_mlp_gradcheck():
    p = _moe_params(3, 6, 4, seed=150)
    x = randn(5, 6, seed=156)
    names = list(p)

    def f(x, *ws):
        return reference.moe_mlp(x, **dict(zip(names, ws)), k=2)

    inputs = [x.requires_grad_()] + [p[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs)
