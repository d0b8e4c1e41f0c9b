"""attention, attention_backward, kv_cache_append, attention_decode and KVCache on the CPU: against
the float64 oracle (gptoss_ext/reference.py), gradients (gradcheck, parity with autograd through
the oracle), decode vs prefill, opcheck, torch.compile, bad input, and a property test.

Accuracy rule (design.md): the kernel's error against the float64 oracle (inputs rounded to the
kernel's dtype first) is at most 2x the error of the same oracle run in the kernel's dtype."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOL, assert_close, assert_error_within
from gptoss_ext import KVCache, ops, reference

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(b, tq, tk, hq, hkv, d, dtype, sinks=True, sink_scale=1.0, gen=None):
    """q, k, v in `dtype` (from float64 normals) and float32 sinks (as gpt-oss stores them) or None."""
    def rnd(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen).to(dtype)
    s = (torch.randn(hq, dtype=F64, generator=gen) * sink_scale).float() if sinks else None
    return rnd(b, tq, hq, d), rnd(b, tk, hkv, d), rnd(b, tk, hkv, d), s


def dbl(t):
    return None if t is None else t.double()


def check_forward(q, k, v, sinks, window=0, q_offset=0, out=None, lse=None):
    """Kernel (or the given out/lse) vs the float64 oracle under the 2x rule, lse included."""
    if out is None:
        out, lse = ops.attention(q, k, v, sinks, window=window, q_offset=q_offset)
    o64, l64 = reference.attention(dbl(q), dbl(k), dbl(v), dbl(sinks), window=window, q_offset=q_offset)
    o_ref, l_ref = reference.attention(q, k, v, sinks, window=window, q_offset=q_offset)
    acc = F64 if q.dtype == F64 else torch.float32
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == acc and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any() and not lse.isnan().any() and not out.isinf().any()
    assert_error_within(out, o64, o_ref)
    # lse: -inf exactly where the oracle has -inf (empty rows without sinks), else the 2x rule.
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[~fin] == -math.inf).all()
    if fin.any():
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, l64[fin].abs().max().item())
        assert_error_within(lse[fin], l64[fin], l_ref[fin], floor=floor if acc != F64 else 1e-12)
    return out, lse


# (B, Tq, Tk, Hq, Hkv, D, q_offset): gpt-oss heads (64/8, D 64), GQA ratios 1/4/8, D 128 and an
# odd D, Tq/Tk across the tile sizes, q_offset > 0 (Tk = q_offset + Tq), one query over a long key
# range, and a few sequences/heads so that split-K runs (B * Hkv * query blocks < threads).
SHAPES = [
    (2, 1, 1, 4, 1, 64, 0),
    (1, 7, 7, 8, 2, 40, 0),
    (2, 64, 64, 8, 8, 64, 0),
    (1, 129, 129, 64, 8, 64, 0),
    (1, 300, 300, 8, 1, 128, 0),
    (1, 50, 350, 8, 2, 64, 300),
    (1, 1, 1024, 64, 8, 64, 1023),
    (1, 3, 700, 4, 1, 64, 697),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Tq{}_Tk{}_H{}-{}_D{}_off{}".format(*s))
@pytest.mark.parametrize("window, dtype", [(0, torch.float32), (0, torch.bfloat16), (128, torch.float32),
                                           (128, torch.bfloat16), (128, torch.float16), (5, torch.float32),
                                           (5, torch.bfloat16)])
def test_forward_matches_oracle(shape, window, dtype):
    b, tq, tk, hq, hkv, d, off = shape
    q, k, v, s = make(b, tq, tk, hq, hkv, d, dtype, sinks=(tq + window) % 2 == 0)
    check_forward(q, k, v, s, window, off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_1024(dtype):
    q, k, v, s = make(1, 1024, 1024, 8, 2, 64, dtype)
    check_forward(q, k, v, s, window=128)


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_1024_gptoss_heads(window, dtype):
    q, k, v, s = make(1, 1024, 1024, 64, 8, 64, dtype)
    check_forward(q, k, v, s, window=window)


def test_forward_float64_exact():
    q, k, v, s = make(2, 70, 90, 6, 3, 24, F64)
    out, lse = ops.attention(q, k, v, s, window=33, q_offset=20)
    o64, l64 = reference.attention(q, k, v, s.double(), window=33, q_offset=20)
    torch.testing.assert_close(out, o64, **TOL[F64])
    torch.testing.assert_close(lse, l64, **TOL[F64])


def test_default_and_custom_scale():
    q, k, v, s = make(1, 40, 40, 4, 2, 64, torch.float32)
    out, _ = ops.attention(q, k, v, s)
    assert_close(out, reference.attention(q, k, v, s, sm_scale=0.125)[0])
    out, lse = ops.attention(q, k, v, s, sm_scale=0.3, window=7)
    o, l = reference.attention(q, k, v, s, sm_scale=0.3, window=7)
    assert_close(out, o)
    assert_close(lse, l)


@pytest.mark.parametrize("sink", [1e4, -1e4, 80.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_sinks(sink, dtype):
    q, k, v, _ = make(1, 150, 150, 8, 2, 64, dtype)
    s = torch.full((8,), sink)
    s[::2] = 0.5  # mixed with ordinary heads
    out, lse = check_forward(q, k, v, s, window=128)
    if sink > 0:  # the sink takes (nearly) all the mass
        assert out[:, :, 1::2].abs().max() < 1e-6
        assert torch.allclose(lse[:, 1::2], torch.full_like(lse[:, 1::2], sink), rtol=1e-6, atol=0)
    else:  # a sink of -1e4 is no sink
        o_none, l_none = ops.attention(q, k, v, None, window=128)
        assert torch.equal(out[:, :, 1::2], o_none[:, :, 1::2])
        assert torch.equal(lse[:, 1::2], l_none[:, 1::2])


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("tq, tk, window, q_offset", [
    (10, 3, 5, 0),    # queries at positions >= 7 see no key (all keys older than the window)
    (6, 0, 0, 0),     # no keys at all
    (4, 2, 3, 10),    # every query beyond the keys' window
])
def test_empty_rows(with_sinks, tq, tk, window, q_offset):
    q, k, v, s = make(2, tq, tk, 4, 2, 16, torch.float32, sinks=with_sinks)
    out, lse = check_forward(q, k, v, s, window, q_offset)
    empty = torch.ones(tq, dtype=torch.bool)
    for i in range(tq):
        empty[i] = not any((window == 0 or j > q_offset + i - window) and j <= q_offset + i for j in range(tk))
    assert empty.any()
    assert (out[:, empty] == 0).all()
    want = s.view(1, -1, 1).expand(2, -1, int(empty.sum())) if with_sinks else -math.inf
    assert torch.equal(lse[:, :, empty], torch.as_tensor(want).expand(2, 4, int(empty.sum())))
    # Gradients stay finite (zero for q of empty rows; the sink of an empty row gets -p_sink * D = 0).
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    sg = s.clone().requires_grad_() if with_sinks else None
    o, _ = ops.attention(qg, kg, vg, sg, window=window, q_offset=q_offset)
    o.square().sum().backward()
    for t in (qg, kg, vg) + ((sg,) if with_sinks else ()):
        assert torch.isfinite(t.grad).all()
    assert (qg.grad[:, empty] == 0).all()


def test_noncontiguous_qkv():
    # q, k, v as views into one fused projection output, as the model produces them.
    hq, hkv, d, t = 8, 2, 64, 200
    qkv = torch.randn(2, t, (hq + 2 * hkv) * d).bfloat16()
    q = qkv[..., : hq * d].view(2, t, hq, d)
    k = qkv[..., hq * d:(hq + hkv) * d].view(2, t, hkv, d)
    v = qkv[..., (hq + hkv) * d:].view(2, t, hkv, d)
    s = torch.randn(hq)
    out, lse = ops.attention(q, k, v, s, window=128)
    o2, l2 = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), s, window=128)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    check_forward(q, k, v, s, window=128, out=out, lse=lse)


def test_deterministic():
    q, k, v, s = make(1, 200, 200, 8, 2, 64, torch.bfloat16)
    out, lse = ops.attention(q, k, v, s, window=128)
    g = torch.randn_like(out)
    r1 = torch.ops.gptoss_ext.attention_backward(g, q, k, v, s, out, lse, 0.125, 128, 0)
    r2 = torch.ops.gptoss_ext.attention_backward(g, q, k, v, s, out, lse, 0.125, 128, 0)
    o2, l2 = ops.attention(q, k, v, s, window=128)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("case", [
    dict(b=1, tq=5, tk=9, hq=4, hkv=2, d=4, window=3, q_offset=4, sinks=True),
    dict(b=2, tq=6, tk=6, hq=2, hkv=2, d=5, window=0, q_offset=0, sinks=True),
    dict(b=1, tq=7, tk=7, hq=4, hkv=1, d=4, window=2, q_offset=0, sinks=False),
    dict(b=1, tq=70, tk=70, hq=1, hkv=1, d=2, window=0, q_offset=0, sinks=True),  # two key tiles
])
def test_gradcheck(case):
    q, k, v, s = make(case["b"], case["tq"], case["tk"], case["hq"], case["hkv"], case["d"], F64,
                      sinks=case["sinks"])
    inputs = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    if case["sinks"]:
        inputs.append(s.double().requires_grad_())

    def f(*xs):  # both outputs: the lse gradient path is checked too
        return ops.attention(*xs[:3], xs[3] if len(xs) > 3 else None, window=case["window"],
                             q_offset=case["q_offset"])

    torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=case["tq"] > 10)


def _grads(fn, inputs, g_out, g_lse):
    xs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*xs)
    loss = (out.to(g_out.dtype) * g_out).sum()
    if g_lse is not None:
        loss = loss + (lse.to(g_lse.dtype) * g_lse).sum()
    loss.backward()
    return [None if x is None else x.grad for x in xs]


@pytest.mark.parametrize("with_lse_grad", [False, True])
def test_gradient_parity_float32(with_lse_grad):
    """T=300, Hq=8, Hkv=2, D=64, window 128: our gradients vs autograd through the oracle, both in
    float32, measured against float64 autograd through the oracle."""
    q, k, v, s = make(1, 300, 300, 8, 2, 64, torch.float32)
    g_out = torch.randn(1, 300, 8, 64, dtype=F64)
    g_lse = torch.randn(1, 8, 300, dtype=F64) if with_lse_grad else None
    ours = _grads(lambda *x: ops.attention(*x, window=128), [q, k, v, s], g_out.float(),
                  None if g_lse is None else g_lse.float())
    ref32 = _grads(lambda *x: reference.attention(*x, window=128), [q, k, v, s], g_out.float(),
                   None if g_lse is None else g_lse.float())
    ref64 = _grads(lambda *x: reference.attention(*x, window=128), [dbl(t) for t in (q, k, v, s)], g_out, g_lse)
    for name, a, r32, r64 in zip("qkvs", ours, ref32, ref64):
        assert a.dtype == torch.float32, name
        assert_error_within(a, r64, r32, floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_low_precision(dtype):
    q, k, v, s = make(2, 140, 140, 8, 2, 64, dtype)
    g_out = torch.randn(2, 140, 8, 64).to(dtype)
    ours = _grads(lambda *x: ops.attention(*x, window=128), [q, k, v, s], g_out, None)
    ref = _grads(lambda *x: reference.attention(*x, window=128), [q, k, v, s], g_out, None)
    ref64 = _grads(lambda *x: reference.attention(*x, window=128), [dbl(t) for t in (q, k, v, s)],
                   g_out.double(), None)
    for name, a, r, r64 in zip("qkv", ours, ref, ref64):
        assert a.dtype == dtype, name
        assert_error_within(a, r64, r, floor=1e-3)
    # The sink gradient -sum p_sink * D_i uses D_i = rowsum(dO * O) with the stored output O,
    # rounded to `dtype` (as in FlashAttention), while the oracle's autograd uses its float32 O:
    # its error follows the dtype's rounding, not float32's.
    assert ours[3].dtype == torch.float32
    assert_close(ours[3], ref64[3], dtype)


@pytest.mark.parametrize("tq, hq, hkv, d, window", [(37, 8, 8, 96, 0), (140, 8, 1, 128, 5), (70, 16, 2, 32, 128)])
def test_gradient_bf16_head_dims_and_groups(tq, hq, hkv, d, window):
    """bf16 gradients for other head dims (32, 96, 128: one and two 64-column chunks of the AMX
    products), group sizes 1, 8 and 16 and partial row groups: within 2x the error of the oracle
    run in bf16 (the AMX backward splits P and dS into bf16 hi + lo parts; the no-AMX rerun
    covers the float GEMMs)."""
    q, k, v, s = make(1, tq, tq, hq, hkv, d, torch.bfloat16)
    g_out = torch.randn(1, tq, hq, d).bfloat16()
    ours = _grads(lambda *x: ops.attention(*x, window=window), [q, k, v, s], g_out, None)
    ref = _grads(lambda *x: reference.attention(*x, window=window), [q, k, v, s], g_out, None)
    ref64 = _grads(lambda *x: reference.attention(*x, window=window), [dbl(t) for t in (q, k, v, s)],
                   g_out.double(), None)
    for name, a, r, r64 in zip("qkv", ours, ref, ref64):
        assert a.dtype == torch.bfloat16, name
        assert_error_within(a, r64, r, floor=1e-3)


def test_unused_lse_costs_nothing_extra_compiled(monkeypatch):
    """Under torch.compile an unused lse must not pull the lse-gradient work into the graph."""
    seen = []
    real = ops._is_traced
    monkeypatch.setattr(ops, "_is_traced", lambda t: seen.append(t) or real(t))
    q, k, v, s = make(1, 40, 40, 8, 2, 64, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, s):
        return ops.attention(q, k, v, s, window=16)[0].square().sum()

    xs = [t.clone().requires_grad_() for t in (q, k, v, s)]
    f(*xs).backward()
    assert seen == []
    ys = [t.clone().requires_grad_() for t in (q, k, v, s)]
    ops.attention(*ys, window=16)[0].square().sum().backward()
    for a, b in zip(xs, ys):
        assert_close(a.grad, b.grad)


def test_zero_lse_grad_costs_nothing_extra(monkeypatch):
    """An unused or all-zero lse gradient: only the backward op runs."""
    q, k, v, s = make(1, 20, 20, 4, 2, 16, torch.float32)
    calls, real = [], ops._ops

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    q.requires_grad_()
    out, _ = ops.attention(q, k, v, s)
    monkeypatch.setattr(ops, "_ops", Spy())
    out.sum().backward(retain_graph=True)
    assert calls == ["attention_backward"] and torch.isfinite(q.grad).all()
    out2, lse2 = ops.attention(q, k, v, s)
    calls.clear()
    (out2.sum() + 0 * lse2.sum()).backward()  # an explicit all-zero lse gradient
    assert calls == ["attention_backward"]


# ------------------------------------------------------------------------ KV cache and decode

def prefill_reference(q, k, v, s, window):
    """The prefill op on the full history (what decode must reproduce)."""
    return ops.attention(q, k, v, s, window=window)


@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_prefill(window, step, dtype):
    b, t, hq, hkv, d, prompt = 2, 60, 8, 2, 64, 13
    q, k, v, s = make(b, t, t, hq, hkv, d, dtype)
    cache = KVCache(b, t, hkv, d, window=window, max_step=max(step, prompt), dtype=dtype)
    outs, lses = [], []
    pos = 0
    while pos < t:
        n = prompt if pos == 0 else min(step, t - pos)
        cache.append(k[:, pos:pos + n], v[:, pos:pos + n])
        o, l = cache.attend(q[:, pos:pos + n], s)
        cache.advance(n)
        outs.append(o)
        lses.append(l)
        pos += n
    o_ref, l_ref = prefill_reference(q, k, v, s, window)
    assert_close(torch.cat(outs, 1), o_ref, dtype)
    assert_close(torch.cat(lses, 2), l_ref, torch.float32)
    assert cache.host_lengths == [t] * b and cache.lengths.tolist() == [t] * b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ring_wraps_past_window(dtype):
    """A sliding layer's ring cache (S = round_up(window + max_step - 1, 64) slots) wrapping
    several times: positions up to > 2 * S, with steps of 1 and 3 tokens."""
    b, hq, hkv, d, window, t = 2, 8, 2, 64, 40, 300
    q, k, v, s = make(b, t, t, hq, hkv, d, dtype)
    cache = KVCache(b, 4096, hkv, d, window=window, max_step=3, dtype=dtype)
    assert cache.ring and cache.slots == 64
    outs, pos, steps = [], 0, [3, 1]
    while pos < t:
        n = min(steps[len(outs) % 2], t - pos)
        cache.append(k[:, pos:pos + n], v[:, pos:pos + n])
        outs.append(cache.attend(q[:, pos:pos + n], s)[0])
        cache.advance(n)
        pos += n
    assert pos > 2 * cache.slots
    assert_close(torch.cat(outs, 1), prefill_reference(q, k, v, s, window)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ring_wraps_inside_key_tile(dtype):
    """gpt-oss's window (128) over a minimal ring (S = 128 slots), one token per step: most steps
    see a 64-key tile that straddles the ring's wrap at a slot that is not a multiple of 16, so
    the tile is gathered from two runs of slots."""
    b, hq, hkv, d, window, t = 2, 8, 2, 64, 128, 200
    q, k, v, s = make(b, t, t, hq, hkv, d, dtype)
    kc = torch.zeros(b, window, hkv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    outs = []
    for pos in range(t):
        lengths = torch.full((b,), pos, dtype=torch.int32)
        ops.kv_cache_append(kc, vc, k[:, pos:pos + 1], v[:, pos:pos + 1], lengths, ring=True)
        outs.append(ops.attention_decode(q[:, pos:pos + 1], kc, vc, lengths, s, window=window, ring=True)[0])
    assert_close(torch.cat(outs, 1), prefill_reference(q, k, v, s, window)[0], dtype)


def test_decode_ring_minimal_slots():
    """The op with the smallest legal ring (S = window + Tq - 1) against the oracle."""
    b, hq, hkv, d, window, tq = 1, 4, 1, 32, 10, 3
    q, k, v, s = make(b, 60, 60, hq, hkv, d, torch.float32)
    S = window + tq - 1
    kc = torch.zeros(b, S, hkv, d)
    vc = torch.zeros_like(kc)
    for pos in range(0, 60, tq):
        lengths = torch.tensor([pos], dtype=torch.int32)
        ops.kv_cache_append(kc, vc, k[:, pos:pos + tq], v[:, pos:pos + tq], lengths, ring=True)
        out, lse = ops.attention_decode(q[:, pos:pos + tq], kc, vc, lengths, s, window=window, ring=True)
        o_ref, l_ref = reference.attention(q[:, pos:pos + tq], k[:, :pos + tq], v[:, :pos + tq], s, window=window,
                                           q_offset=pos)
        assert_close(out, o_ref)
        assert_close(lse, l_ref)


@pytest.mark.parametrize("window", [0, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ragged_batch(dtype, window):
    """Sequences of different lengths in one batch: each query sees only its own history."""
    lens = [5, 130, 0, 77]
    b, hq, hkv, d = len(lens), 64, 8, 64
    q, k, v, s = make(b, 1, 140, hq, hkv, d, dtype)
    kc = torch.zeros(b, 200, hkv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    lengths = torch.tensor(lens, dtype=torch.int32)
    for i, n in enumerate(lens):  # history, then the new token at position n
        kc[i, : n + 1], vc[i, : n + 1] = k[i, : n + 1], v[i, : n + 1]
    kc[:, 140:] = float("nan")  # never read: beyond every sequence's length
    vc[:, 140:] = float("nan")
    out, lse = ops.attention_decode(q, kc, vc, lengths, s, window=window)
    for i, n in enumerate(lens):
        check_forward(q[i:i + 1], k[i:i + 1, : n + 1], v[i:i + 1, : n + 1], s, window, n,
                      out=out[i:i + 1], lse=lse[i:i + 1])


def test_decode_split_k_long_cache():
    """One sequence, one kv head, a long cache: the decode runs split-K (partial softmax states
    merged); it must match the oracle, with and without sinks, full and windowed."""
    q, k, v, s = make(1, 1, 1500, 8, 1, 64, torch.float32)
    lengths = torch.tensor([1499], dtype=torch.int32)
    for sinks in (s, None):
        for window in (0, 700):
            out, lse = ops.attention_decode(q, k, v, lengths, sinks, window=window)
            check_forward(q, k, v, sinks, window, 1499, out=out, lse=lse)


def test_kv_cache_append_slots():
    kc = torch.zeros(2, 8, 2, 4)
    vc = torch.zeros(2, 8, 2, 4)
    k = torch.randn(2, 3, 2, 4)
    v = torch.randn(2, 3, 2, 4)
    ops.kv_cache_append(kc, vc, k, v, torch.tensor([0, 6], dtype=torch.int32), ring=True)
    assert torch.equal(kc[0, :3], k[0]) and torch.equal(vc[0, :3], v[0])
    assert torch.equal(kc[1, 6:], k[1, :2]) and torch.equal(kc[1, 0], k[1, 2])  # wraps to slot 0
    assert (kc[0, 3:] == 0).all() and (kc[1, 1:6] == 0).all()
    ops.kv_cache_append(kc, vc, k, v, torch.tensor([3, 1], dtype=torch.int32))
    assert torch.equal(kc[0, 3:6], k[0]) and torch.equal(vc[1, 1:4], v[1])


def test_kv_cache_class():
    cache = KVCache(2, 10, 2, 8, dtype=torch.float32)
    assert not cache.ring and cache.slots == 10
    cache.append(torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8))
    cache.advance([6, 2])
    assert cache.host_lengths == [6, 2] and cache.lengths.tolist() == [6, 2]
    with pytest.raises(ValueError, match="cache overflow: sequence 0 would reach 11 tokens, capacity 10"):
        cache.append(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8))
    cache.reset()
    assert cache.host_lengths == [0, 0] and cache.lengths.tolist() == [0, 0]
    ring = KVCache(1, 1000, 1, 8, window=128, max_step=4, dtype=torch.float32)
    assert ring.ring and ring.slots == 192
    with pytest.raises(ValueError, match="max_step"):
        ring.append(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
    small = KVCache(1, 100, 1, 8, window=128)  # max_len below the ring size: a plain cache
    assert not small.ring and small.slots == 100


# ------------------------------------------------------------------- opcheck, compile, errors

def test_opcheck_attention():
    q, k, v, s = make(1, 9, 13, 4, 2, 16, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), s.requires_grad_(), 0.25, 5, 4)
    torch.library.opcheck(torch.ops.gptoss_ext.attention.default, args)
    torch.library.opcheck(torch.ops.gptoss_ext.attention.default, (q, k, v, None, 0.25, 0, 4))
    out, lse = torch.ops.gptoss_ext.attention(q.detach(), k.detach(), v.detach(), s.detach(), 0.25, 5, 4)
    torch.library.opcheck(torch.ops.gptoss_ext.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), s.detach(), out, lse,
                           0.25, 5, 4))


def test_opcheck_cache_ops():
    q = torch.randn(2, 2, 4, 16).bfloat16()
    kc = torch.randn(2, 12, 2, 16).bfloat16()
    vc = torch.randn(2, 12, 2, 16).bfloat16()
    k = torch.randn(2, 2, 2, 16).bfloat16()
    v = torch.randn(2, 2, 2, 16).bfloat16()
    lengths = torch.tensor([3, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gptoss_ext.kv_cache_append.default, (kc, vc, k, v, lengths, True))
    torch.library.opcheck(torch.ops.gptoss_ext.attention_decode.default,
                          (q, kc, vc, lengths, torch.randn(4), 0.25, 5, True))


def test_compile_fullgraph_attention():
    q, k, v, s = make(1, 70, 70, 8, 2, 64, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, s):
        out, lse = ops.attention(q * 1.5, k, v, s, window=16)
        return out.sum() + lse.sum()

    xs = [t.clone().requires_grad_() for t in (q, k, v, s)]
    f(*xs).backward()
    ys = [t.clone().requires_grad_() for t in (q, k, v, s)]
    out, lse = ops.attention(ys[0] * 1.5, *ys[1:3], ys[3], window=16)
    (out.sum() + lse.sum()).backward()
    for a, b in zip(xs, ys):
        assert_close(a.grad, b.grad)


def test_compile_fullgraph_decode():
    q, k, v, s = make(2, 1, 40, 8, 2, 64, torch.bfloat16)
    kc = torch.zeros(2, 64, 2, 64, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    kc[:, :39], vc[:, :39] = k[:, :39], v[:, :39]
    lengths = torch.tensor([39, 39], dtype=torch.int32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, kn, vn, kc, vc, lengths, s):
        ops.kv_cache_append(kc, vc, kn, vn, lengths)
        return ops.attention_decode(q, kc, vc, lengths, s, window=16)

    out, lse = step(q, k[:, 39:], v[:, 39:], kc, vc, lengths, s)
    assert torch.equal(kc[:, 39], k[:, 39])  # the in-place write happened
    o_ref, l_ref = ops.attention(q, k, v, s, window=16, q_offset=39)
    assert_close(out, o_ref)
    assert_close(lse, l_ref, torch.float32)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


I32 = torch.int32


@pytest.mark.parametrize("fn, pattern", [
    (lambda: ops.attention(_r(1, 4, 6, 8), _r(1, 4, 4, 8), _r(1, 4, 4, 8)), r"Hq = 6\) must be a positive multiple"),
    (lambda: ops.attention(_r(4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8)), r"q must be \[B, Tq, Hq, D\]"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(4, 2, 8), _r(1, 4, 2, 8)), r"k must be \[B, Tk, Hkv, D\]"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 5, 2, 8)), r"v must have k's shape"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 4), _r(1, 4, 2, 4)), r"k must have q's head dim 8"),
    (lambda: ops.attention(_r(2, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8)), r"k must have q's batch size 2"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8, dtype=torch.bfloat16), _r(1, 4, 2, 8)),
     r"k must have the dtype of q"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8), _r(4)), r"sinks must be \[Hq\] = \[8\]"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8), window=-1), r"window must be >= 0"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8), q_offset=-2), r"q_offset must be >= 0"),
    (lambda: ops.attention(_r(1, 4, 8, 8), _r(1, 4, 2, 8), _r(1, 4, 2, 8), sm_scale=float("inf")),
     r"sm_scale must be finite"),
    (lambda: ops.attention(_r(1, 4, 2, 256), _r(1, 4, 2, 256), _r(1, 4, 2, 256)), r"head dim D must be in \[1, 128\]"),
    (lambda: ops.attention(_r(1, 4, 2, 8).int(), _r(1, 4, 2, 8).int(), _r(1, 4, 2, 8).int()), r"q must be float32"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 3, 2, 4), _r(2, 3, 2, 4),
                                 torch.tensor([0, 6], dtype=I32)), r"cache overflow: lengths\[1\] = 6"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 3, 2, 4), _r(2, 3, 2, 4),
                                 torch.tensor([0, 6])), r"lengths must be int32"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 3, 2, 4), _r(2, 3, 2, 4),
                                 torch.tensor([0, -1], dtype=I32)), r"lengths must be >= 0"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 3, 2, 4), _r(2, 3, 2, 4),
                                 torch.tensor([0], dtype=I32)), r"lengths must be \[B\] = \[2\]"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 3, 1, 4), _r(2, 3, 1, 4),
                                 torch.tensor([0, 0], dtype=I32)), r"k must be \[B, Tn, Hkv, D\] matching k_cache"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4), _r(2, 8, 2, 4), _r(2, 9, 2, 4), _r(2, 9, 2, 4),
                                 torch.tensor([0, 0], dtype=I32), ring=True), r"ring cache of 8 slots cannot take 9"),
    (lambda: ops.kv_cache_append(_r(2, 8, 2, 4).transpose(1, 2), _r(2, 8, 2, 4).transpose(1, 2), _r(2, 3, 8, 4),
                                 _r(2, 3, 8, 4), torch.tensor([0, 0], dtype=I32)), r"must be contiguous"),
    (lambda: ops.attention_decode(_r(2, 1, 8, 4), _r(2, 8, 2, 4), _r(2, 8, 2, 4), torch.tensor([7, 8], dtype=I32)),
     r"cache overflow: lengths\[1\] = 8 \+ Tq = 1 exceeds the cache size S = 8"),
    (lambda: ops.attention_decode(_r(2, 1, 8, 4), _r(2, 8, 2, 4), _r(2, 8, 2, 4), torch.tensor([1, 2])),
     r"lengths must be int32"),
    (lambda: ops.attention_decode(_r(2, 1, 8, 4), _r(2, 8, 2, 4), _r(2, 8, 2, 4), torch.tensor([1, -2], dtype=I32)),
     r"lengths must be >= 0"),
    (lambda: ops.attention_decode(_r(2, 1, 6, 4), _r(2, 8, 4, 4), _r(2, 8, 4, 4), torch.tensor([1, 2], dtype=I32)),
     r"must be a positive multiple of k_cache's heads"),
    (lambda: ops.attention_decode(_r(2, 3, 8, 4), _r(2, 8, 2, 4), _r(2, 8, 2, 4), torch.tensor([1, 2], dtype=I32),
                                  window=7, ring=True), r"S >= window \+ Tq - 1 \(= 9\)"),
    (lambda: ops.attention_decode(_r(2, 1, 8, 4), _r(2, 8, 2, 4), _r(2, 8, 2, 4), torch.tensor([1, 2], dtype=I32),
                                  _r(3)), r"sinks must be \[Hq\] = \[8\]"),
])
def test_bad_input(fn, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_bad_backward_input():
    q, k, v, s = make(1, 5, 5, 4, 2, 8, torch.float32)
    out, lse = ops.attention(q, k, v, s)
    bw = torch.ops.gptoss_ext.attention_backward
    with pytest.raises(RuntimeError, match=r"lse must be \[B, Hq, Tq\] = \[1, 4, 5\]"):
        bw(out, q, k, v, s, out, lse.transpose(1, 2), 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"lse must be Float"):
        bw(out, q, k, v, s, out, lse.double(), 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have q's shape"):
        bw(out[:, :3], q, k, v, s, out, lse, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"out must have the dtype of q"):
        bw(out, q, k, v, s, out.double(), lse, 0.5, 0, 0)


# ------------------------------------------------------------------------------ property test

@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), tq=st.integers(1, 80), extra_k=st.integers(-10, 80), hkv=st.sampled_from([1, 2, 3]),
       group=st.sampled_from([1, 2, 4, 8]), d=st.sampled_from([1, 8, 17, 40, 64, 128]),
       dtype=st.sampled_from(DTYPES + [F64]), window=st.sampled_from([0, 1, 3, 16, 64, 100]),
       q_offset=st.integers(0, 70), sink_mag=st.sampled_from([None, 0.1, 3.0, 50.0, 1e4]),
       seed=st.integers(0, 2**31 - 1))
def test_property_against_oracle(b, tq, extra_k, hkv, group, d, dtype, window, q_offset, sink_mag, seed):
    tk = max(0, q_offset + tq + extra_k)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, s = make(b, tq, tk, hkv * group, hkv, d, dtype, sinks=sink_mag is not None,
                      sink_scale=sink_mag or 1.0, gen=gen)
    check_forward(q, k, v, s, window, q_offset)


def test_bf16_without_amx():
    """bf16 runs its products on AMX tiles where the CPU has them (forward and backward), else with
    vdpbf16ps (decode) or the float FMA GEMMs: rerun the forward, gradient, decode and single-query
    tests with AMX switched off (GPTOSS_EXT_NO_AMX) so that every path is tested on an AMX machine
    (elsewhere both runs take the same paths)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, GPTOSS_EXT_NO_AMX="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "(decode or Tq1 or forward_matches_oracle or forward_1024 or empty_rows or extreme_sinks or gradient)"
                        " and not without_amx"],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
