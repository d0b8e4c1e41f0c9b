"""MoE ops (spec §2.4, §3.2): routing, dispatch, SwiGLU, grouped expert GEMM (dense and MXFP4),
combine, the MXFP4 codec and the composed moe_mlp, against gptoss_ext.reference; gradients,
opcheck, torch.compile, bad input, property tests."""
import contextlib
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close, assert_error_within
from gptoss_ext import ops, reference

_ops = torch.ops.gptoss_ext
LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# ------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def one_thread():
    """The oracle's per-expert loop is hundreds of small ops; on a loaded machine each parallel
    region waits for a descheduled thread, so the oracle runs on one thread (our ops keep theirs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def ref_moe_mlp(*args, **kwargs):
    with one_thread():
        return reference.moe_mlp(*args, **kwargs)


def make_block(t, e, d, inter, dtype=torch.float32, gate_scale=1.0):
    """Random MoE block parameters (float32 masters) and input x [t, d] in dtype."""
    x = torch.randn(t, d)
    p = dict(gate_weight=torch.randn(e, d) * gate_scale / math.sqrt(d), gate_bias=torch.randn(e) * 0.5,
             mlp1_weight=torch.randn(e, 2 * inter, d) / math.sqrt(d), mlp1_bias=torch.randn(e, 2 * inter) * 0.5,
             mlp2_weight=torch.randn(e, d, inter) / math.sqrt(inter), mlp2_bias=torch.randn(e, d) * 0.5)
    return x.to(dtype), {n: v.to(dtype) for n, v in p.items()}


def mlp_args(p, w1=None, w2=None):
    return (p["gate_weight"], p["gate_bias"], p["mlp1_weight"] if w1 is None else w1, p["mlp1_bias"],
            p["mlp2_weight"] if w2 is None else w2, p["mlp2_bias"])


def grouping(t, e, k, skew=None):
    """experts [t, k] (distinct per token) and moe_dispatch's outputs."""
    logits = torch.randn(t, e) if skew is None else skew
    _, experts = reference.moe_route(logits, k)
    order, row_token, offsets = ops.moe_dispatch(experts, e)
    return experts, order, row_token, offsets


def gemm_oracle(x, row_index, offsets, w, b, fused, alpha=1.702, limit=7.0):
    """Grouped GEMM in float64 on the same (already rounded) inputs."""
    xs = x.double() if row_index is None else x.double()[row_index.long()]
    outs = []
    for e in range(w.shape[0]):
        r0, r1 = int(offsets[e]), int(offsets[e + 1])
        h = xs[r0:r1] @ w[e].double().t()
        if b is not None:
            h = h + b[e].double()
        outs.append(reference.swiglu(h, alpha, limit) if fused else h)
    return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[1] // (2 if fused else 1))


def dispatch_oracle(experts, e):
    flat = experts.flatten().long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=e)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return order.int(), (order // experts.shape[1]).int(), offsets.int()


def deq_equal(a, b):
    """Bitwise equality, NaN == NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        ((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.signbit(), b.signbit())


# ------------------------------------------------------------------------------- routing

ROUTE_CASES = [(1, 32, 4), (7, 32, 4), (513, 32, 4), (7, 128, 4), (64, 128, 4), (1, 3, 1), (7, 3, 2), (513, 3, 3),
               (5, 8, 8)]


@pytest.mark.parametrize("t,e,k", ROUTE_CASES)
@pytest.mark.parametrize("dtype", ALL)
def test_route_matches_oracle(t, e, k, dtype):
    logits = (torch.randn(t, e) * 3).to(dtype)
    w, ex = ops.moe_route(logits, k)
    w_ref, ex_ref = reference.moe_route(logits, k)
    assert ex.dtype == torch.int32 and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ex, ex_ref)
    assert_close(w, w_ref, w.dtype)
    assert_close(w.sum(-1), torch.ones(t, dtype=w.dtype), w.dtype)


def test_route_ties_lower_index_first():
    logits = torch.randint(-2, 3, (300, 16)).float()  # many exact ties
    for k in (1, 4, 16):
        w, ex = ops.moe_route(logits, k)
        w_ref, ex_ref = reference.moe_route(logits, k)
        assert torch.equal(ex, ex_ref)
        assert_close(w, w_ref)
    w, ex = ops.moe_route(torch.zeros(3, 32), 4)  # all equal: experts 0..3, uniform weights
    assert torch.equal(ex, torch.arange(4, dtype=torch.int32).expand(3, 4))
    assert_close(w, torch.full((3, 4), 0.25))


def test_route_bf16_ties_match_stable_sort():
    # bf16 logits tie often; the order must be the stable descending sort's, not torch.topk's.
    logits = (torch.randn(200, 32) * 0.05).bfloat16()
    assert (logits.float().unsqueeze(-1) == logits.float().unsqueeze(-2)).sum() > 200 * 32  # ties exist
    assert torch.equal(ops.moe_route(logits, 4)[1], reference.moe_route(logits, 4)[1])


def test_route_nan_ranks_first():
    logits = torch.randn(4, 8)
    logits[1, 5] = float("nan")
    logits[2, [1, 6]] = float("nan")
    w, ex = ops.moe_route(logits, 3)
    w_ref, ex_ref = reference.moe_route(logits, 3)
    assert torch.equal(ex, ex_ref)
    assert torch.equal(w.isnan(), w_ref.isnan())


def test_route_gradcheck():
    logits = (torch.randn(6, 9, dtype=torch.float64) * 2).requires_grad_()
    torch.autograd.gradcheck(lambda z: ops.moe_route(z, 3)[0], (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_grad_matches_oracle(dtype):
    logits = (torch.randn(33, 32) * 2).to(dtype)
    g = torch.randn(33, 4)
    a = logits.clone().requires_grad_()
    (ops.moe_route(a, 4)[0] * g).sum().backward()
    b = logits.clone().requires_grad_()
    (reference.moe_route(b, 4)[0] * g).sum().backward()
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad, dtype)


# ------------------------------------------------------------------------------ dispatch

@pytest.mark.parametrize("t,e,k", [(1, 32, 4), (7, 32, 4), (513, 32, 4), (513, 128, 4), (7, 3, 1), (513, 3, 3)])
def test_dispatch_matches_stable_sort(t, e, k):
    experts, _, _, _ = grouping(t, e, k)
    got = ops.moe_dispatch(experts, e)
    for a, b in zip(got, dispatch_oracle(experts, e)):
        assert a.dtype == torch.int32 and torch.equal(a, b)


def test_dispatch_empty_and_single_expert():
    experts = torch.full((9, 1), 2, dtype=torch.int32)  # every token to expert 2 of 5
    order, row_token, offsets = ops.moe_dispatch(experts, 5)
    assert torch.equal(offsets, torch.tensor([0, 0, 0, 9, 9, 9], dtype=torch.int32))
    assert torch.equal(order, torch.arange(9, dtype=torch.int32)) and torch.equal(row_token, order)
    order, row_token, offsets = ops.moe_dispatch(torch.zeros(0, 4, dtype=torch.int32), 8)
    assert order.numel() == 0 and torch.equal(offsets, torch.zeros(9, dtype=torch.int32))


@pytest.mark.parametrize("bad", [-1, 32, 1000])
def test_dispatch_out_of_range_ids(bad):
    experts = torch.randint(0, 32, (5, 4), dtype=torch.int32)
    experts[3, 2] = bad
    with pytest.raises(RuntimeError, match=r"moe_dispatch: experts values must be in \[0, num_experts\)"):
        ops.moe_dispatch(experts, 32)


# -------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("shape", [(64, 2 * 2880), (3, 5, 2 * 17), (7, 2), (1, 2 * 33), (0, 8)])
@pytest.mark.parametrize("dtype", ALL)
def test_swiglu_matches_oracle(shape, dtype):
    h = (torch.randn(shape) * 6).to(dtype)  # well into both clamps
    y = ops.swiglu(h)
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2)
    ref = reference.swiglu(h.double() if dtype == torch.float64 else h.float())  # the op's math precision
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 0.5), (2.5, None), (1.702, math.inf)])
def test_swiglu_alpha_limit(alpha, limit):
    h = torch.randn(50, 2 * 40) * 10
    assert_close(ops.swiglu(h, alpha, limit), reference.swiglu(h, alpha, limit))
    if limit is not None and limit < 10:
        assert not torch.allclose(ops.swiglu(h, alpha, limit), ops.swiglu(h, alpha, None))


def test_swiglu_clamp_sides_and_noncontiguous():
    # glu is clamped above only, lin on both sides; +1 goes to lin.
    h = torch.tensor([[100.0, 0.0, -100.0, 0.0, 1.0, 100.0, 1.0, -100.0]])
    y = ops.swiglu(h)
    expected = torch.tensor([[7 * torch.sigmoid(torch.tensor(7 * 1.702)), -100 * torch.sigmoid(torch.tensor(-170.2)),
                              8 * torch.sigmoid(torch.tensor(1.702)), -6 * torch.sigmoid(torch.tensor(1.702))]])
    torch.testing.assert_close(y, expected)
    base = torch.randn(40, 2 * 48) * 4
    assert_close(ops.swiglu(base[::2, :]), reference.swiglu(base[::2, :]))
    assert_close(ops.swiglu(base.t().contiguous().t()), reference.swiglu(base))


def test_swiglu_gradcheck():
    h = torch.randn(6, 2 * 21, dtype=torch.float64) * 4
    h = torch.where((h.abs() - 7).abs() < 1e-3, h + 0.01, h).requires_grad_()  # away from the kinks
    torch.autograd.gradcheck(lambda z: ops.swiglu(z, 1.702, 7.0), (h,))
    torch.autograd.gradcheck(lambda z: ops.swiglu(z, 1.3, None), (h,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_grad_matches_oracle(dtype):
    h = (torch.randn(37, 2 * 129) * 6).to(dtype)
    g = torch.randn(37, 129).to(dtype)
    a = h.clone().requires_grad_()
    ops.swiglu(a).backward(g)
    b = h.float().requires_grad_()
    reference.swiglu(b).backward(g.float())
    assert_close(a.grad, b.grad, dtype)
    assert (a.grad[:, 0::2][h[:, 0::2].float() >= 7] == 0).all()
    assert (a.grad[:, 1::2][h[:, 1::2].float().abs() >= 7] == 0).all()


# --------------------------------------------------------------------- dense grouped GEMM

GEMM_CASES = [  # (t, e, k, K, M)
    (7, 32, 4, 64, 128), (513, 3, 2, 64, 50), (7, 128, 4, 64, 64), (1, 3, 1, 96, 34), (64, 4, 4, 48, 30)]


@pytest.mark.parametrize("t,e,k,kdim,m", GEMM_CASES)
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_gemm_matches_oracle(t, e, k, kdim, m, dtype, fused):
    _, _, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, kdim).to(dtype)
    w = (torch.randn(e, m, kdim) / math.sqrt(kdim) * 3).to(dtype)
    b = torch.randn(e, m).to(dtype)
    y = ops.moe_grouped_gemm(x, offsets, w, b, row_token, fused_swiglu=fused)
    assert y.dtype == dtype and y.shape == (t * k, m // 2 if fused else m)
    # float16 runs ATen's GEMM, which rounds h to float16 before the epilogue: one more rounding
    assert_close(y, gemm_oracle(x, row_token, offsets, w, b, fused), dtype, scale=2 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_no_row_index_no_bias_empty_experts(dtype):
    e, kdim, m = 6, 64, 80
    counts = [0, 5, 0, 0, 40, 1]  # experts with no rows, one with many
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    x = torch.randn(sum(counts), kdim).to(dtype)
    w = (torch.randn(e, m, kdim) / 8).to(dtype)
    y = ops.moe_grouped_gemm(x, offsets, w)
    assert_close(y, gemm_oracle(x, None, offsets, w, None, False), dtype)
    y = ops.moe_grouped_gemm(x, offsets, w, fused_swiglu=True, limit=None)
    assert_close(y, gemm_oracle(x, None, offsets, w, None, True, limit=None), dtype)


def test_grouped_gemm_all_rows_one_expert_real_size():
    # bf16, hidden 2880: the VNNI/brgemm path where available, with a 2-row tail of weight rows
    t, e, kdim, m = 40, 3, 2880, 2 * 57
    experts = torch.full((t, 1), 1, dtype=torch.int32)
    _, row_token, offsets = ops.moe_dispatch(experts, e)
    x = torch.randn(t, kdim).bfloat16()
    w = (torch.randn(e, m, kdim) / 50).bfloat16()
    b = torch.randn(e, m).bfloat16()
    for fused in (False, True):
        y = ops.moe_grouped_gemm(x, offsets, w, b, row_token, fused_swiglu=fused)
        assert_close(y, gemm_oracle(x, row_token, offsets, w, b, fused), torch.bfloat16)


def test_grouped_gemm_gradcheck():
    t, e, k, kdim, m = 5, 4, 2, 6, 8
    _, _, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, kdim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, m, kdim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(e, m, dtype=torch.float64, requires_grad=True)
    for fused in (False, True):
        torch.autograd.gradcheck(
            lambda x_, w_, b_: ops.moe_grouped_gemm(x_, offsets, w_, b_, row_token, fused_swiglu=fused, limit=50.0),
            (x, w, b))
    torch.autograd.gradcheck(lambda x_, w_: ops.moe_grouped_gemm(x_[:t * k].repeat(2, 1)[:t * k], offsets, w_),
                             (x, w))


def test_grouped_gemm_backward_partial_mask():
    t, e, k, kdim, m = 9, 3, 2, 32, 16
    _, _, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, kdim)
    w = torch.randn(e, m, kdim, requires_grad=True)
    y = ops.moe_grouped_gemm(x, offsets, w, None, row_token)  # x and bias need no gradient
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, (w,), g)
    w2 = w.detach().clone().requires_grad_()
    (gemm_oracle(x, row_token, offsets, w2, None, False).float() * g).sum().backward()
    assert_close(gw, w2.grad)
    gx, gw, gb = _ops.moe_grouped_gemm_backward(g, x, row_token, offsets, w.detach(), [False, True, False])
    assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape


# -------------------------------------------------------------------- MXFP4 grouped GEMM

def random_mxfp4(e, m, kdim, lo=118, hi=124):
    blocks = torch.randint(0, 256, (e, m, kdim // 32, 16), dtype=torch.uint8)
    scales = torch.randint(lo, hi, (e, m, kdim // 32), dtype=torch.uint8)
    return blocks, scales


MX_CASES = [  # (t, e, k, K, M): direct kernel (<= 16 rows per expert), tiled, mixed, odd tiles
    (1, 32, 4, 64, 128), (7, 3, 2, 96, 50), (513, 3, 3, 64, 34), (100, 4, 2, 128, 130), (40, 2, 1, 32, 16)]


@pytest.mark.parametrize("t,e,k,kdim,m", MX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_gemm_mxfp4_matches_dequantized(t, e, k, kdim, m, dtype, fused):
    _, _, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, kdim).to(dtype)
    blocks, scales = random_mxfp4(e, m, kdim)
    b = torch.randn(e, m).to(dtype)
    y = ops.moe_grouped_gemm(x, offsets, (blocks, scales), b, row_token, fused_swiglu=fused)
    w = reference.mxfp4_dequantize(blocks, scales, torch.float64)
    assert y.dtype == dtype
    assert_close(y, gemm_oracle(x, row_token, offsets, w, b, fused), dtype, scale=2 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("scale_bytes,x_scale", [((2, 3, 4), 2.0 ** 60), ((250, 251, 252, 253, 254), 2.0 ** -60)])
def test_grouped_gemm_mxfp4_tiled_edge_scales(scale_bytes, x_scale):
    # bf16 rows, > 16 rows per expert: the tiled path, whose weight packing adds the scale to the
    # bf16 exponent for scale bytes 2..252 and decodes through floats otherwise (253, 254 here; 0
    # and 1 give bf16 subnormal weights, which AMX reads as zero). One scale byte per weight row, so
    # each output has one scale factor; nibble magnitudes <= 1.5 keep every weight finite in bf16
    # up to scale byte 254; x scaled so that every output stays a normal float32.
    t, e, k, kdim, m = 80, 2, 1, 96, 40
    _, _, row_token, offsets = grouping(t, e, k)
    blocks, _ = random_mxfp4(e, m, kdim)
    blocks &= 0xBB  # sign and the two low magnitude bits of each nibble: |value| <= 1.5
    per_row = torch.tensor(scale_bytes, dtype=torch.uint8).repeat(m)[:m]
    scales = per_row.view(1, m, 1).expand(e, m, kdim // 32).contiguous()
    x = (torch.randn(t, kdim) * x_scale).bfloat16()
    y = ops.moe_grouped_gemm(x, offsets, (blocks, scales), None, row_token)
    w = reference.mxfp4_dequantize(blocks, scales, torch.float64)
    expect = gemm_oracle(x, row_token, offsets, w, None, False)
    assert torch.isfinite(expect).all()
    # float32 sums of exact products, one bf16 rounding: error within a bf16 ulp of the row's size
    size = x.double().abs()[row_token.long()] @ w.abs().amax(0).t()
    assert ((y.double() - expect).abs() <= 2.0 ** -7 * size + 1e-300).all()


def test_grouped_gemm_mxfp4_real_size_and_no_bias():
    t, e, kdim, m = 7, 32, 2880, 2 * 64
    _, _, row_token, offsets = grouping(t, e, 4)
    blocks, scales = random_mxfp4(e, m, kdim, 112, 118)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(t, kdim).to(dtype)
        y = ops.moe_grouped_gemm(x, offsets, (blocks, scales), None, row_token, fused_swiglu=True)
        w = reference.mxfp4_dequantize(blocks, scales, torch.float64)
        assert_close(y, gemm_oracle(x, row_token, offsets, w, None, True), dtype)


def test_grouped_gemm_mxfp4_is_inference_only():
    _, _, row_token, offsets = grouping(3, 4, 2)
    x = torch.randn(3, 64, requires_grad=True)
    y = ops.moe_grouped_gemm(x, offsets, random_mxfp4(4, 32, 64), None, row_token)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


# ------------------------------------------------------------------------------- combine

@pytest.mark.parametrize("t,e,k,d", [(7, 32, 4, 2880), (513, 3, 3, 33), (1, 128, 4, 64), (9, 5, 1, 17)])
@pytest.mark.parametrize("dtype", ALL)
def test_combine_matches_oracle(t, e, k, d, dtype):
    experts, order, _, _ = grouping(t, e, k)
    y = torch.randn(t * k, d).to(dtype)
    w = torch.softmax(torch.randn(t, k), -1)
    out = ops.moe_combine(y, order, w)
    slot_row = torch.empty(t * k, dtype=torch.long)
    slot_row[order.long()] = torch.arange(t * k)
    ref = (y.double()[slot_row].view(t, k, d) * w.double().unsqueeze(-1)).sum(1)
    assert out.dtype == dtype and out.shape == (t, d)
    assert_close(out, ref, dtype)


def test_combine_gradcheck():
    t, e, k, d = 4, 5, 3, 7
    _, order, _, _ = grouping(t, e, k)
    y = torch.randn(t * k, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: ops.moe_combine(a, order, b), (y, w))


def test_combine_rejects_non_permutation():
    y = torch.randn(6, 4)
    w = torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="moe_combine: order must be a permutation"):
        ops.moe_combine(y, torch.tensor([0, 1, 2, 3, 4, 4], dtype=torch.int32), w)
    with pytest.raises(RuntimeError, match=r"moe_combine: order values must be in \[0, N\)"):
        ops.moe_combine(y, torch.tensor([0, 1, 2, 3, 4, 6], dtype=torch.int32), w)


# ------------------------------------------------------------------------------ MXFP4 codec

@pytest.mark.parametrize("dtype", ALL)
def test_dequantize_every_byte_and_scale(dtype):
    # all 256 bytes (every nibble pair) under all 256 scale bytes
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(256, 1, 1)  # [256, 16, 16]
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    got = ops.mxfp4_dequantize(blocks, scales, dtype)
    assert got.shape == (256, 16 * 32)
    assert deq_equal(got, reference.mxfp4_dequantize(blocks, scales, dtype))
    exact = [v * 2.0 ** (s - 127) for s in (0, 1, 127, 254) for v in reference.FP4_VALUES]
    if dtype == torch.float64:
        picked = got.view(256, 16, 32)[[0, 1, 127, 254]][:, 0, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                                                28, 30]]
        assert picked.flatten().tolist() == exact


def test_dequantize_nd_and_noncontiguous():
    blocks = torch.randint(0, 256, (2, 3, 5, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (2, 3, 5), dtype=torch.uint8)
    assert deq_equal(ops.mxfp4_dequantize(blocks, scales), reference.mxfp4_dequantize(blocks, scales))
    bt, st_ = blocks.transpose(0, 1), scales.transpose(0, 1)
    assert deq_equal(ops.mxfp4_dequantize(bt, st_, torch.float32), reference.mxfp4_dequantize(bt, st_, torch.float32))


@pytest.mark.parametrize("dtype", ALL)
def test_quantize_matches_oracle(dtype):
    mags = torch.logspace(-45, 38, 24, dtype=torch.float64).clamp(max=3e38)  # subnormal float .. near max
    w = torch.randn(24, 4, 64, dtype=torch.float64) * mags.view(24, 1, 1)
    w[0, 0] = 0  # an all-zero block
    w[1, 1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4) * 4  # exact ties
    w = w.to(dtype)
    if dtype != torch.float64:
        w = torch.where(w.isfinite(), w, torch.zeros_like(w))
    b, s = ops.mxfp4_quantize(w)
    b_ref, s_ref = reference.mxfp4_quantize(w)
    assert b.shape == (24, 4, 2, 16) and s.shape == (24, 4, 2)
    assert torch.equal(b, b_ref) and torch.equal(s, s_ref)


def test_quantize_round_trip_on_the_grid():
    blocks, scales = random_mxfp4(3, 40, 96, 0, 255)  # every scale 0..254
    grid = reference.mxfp4_dequantize(blocks, scales, torch.float64)
    b2, s2 = ops.mxfp4_quantize(grid)
    assert torch.equal(ops.mxfp4_dequantize(b2, s2, torch.float64), grid)  # value-exact
    assert torch.equal(b2, reference.mxfp4_quantize(grid)[0]) and torch.equal(s2, reference.mxfp4_quantize(grid)[1])
    w = torch.randn(5, 8, 64)
    b, s = ops.mxfp4_quantize(w)
    deq = ops.mxfp4_dequantize(b, s, torch.float32)
    b3, s3 = ops.mxfp4_quantize(deq)
    assert torch.equal(ops.mxfp4_dequantize(b3, s3, torch.float32), deq)
    # bytes can differ only where the block's largest value rounded down to 3 (scale one lower)
    assert ((s3 == s) | (s3 == s - 1)).all() and (s3 == s).float().mean() > 0.5


def test_quantize_rejects_bad_input():
    with pytest.raises(RuntimeError, match="mxfp4_quantize: w must be finite"):
        ops.mxfp4_quantize(torch.tensor([1.0] * 31 + [float("inf")]))
    with pytest.raises(RuntimeError, match="mxfp4_quantize: w's last dim must be a multiple of 32"):
        ops.mxfp4_quantize(torch.randn(4, 48))
    with pytest.raises(RuntimeError, match="mxfp4_dequantize: scales must be"):
        ops.mxfp4_dequantize(torch.zeros(3, 2, 16, dtype=torch.uint8), torch.zeros(3, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="mxfp4_dequantize: blocks must be uint8"):
        ops.mxfp4_dequantize(torch.zeros(3, 2, 16), torch.zeros(3, 2, dtype=torch.uint8))


# ------------------------------------------------------------------------------- moe_mlp

MLP_CASES = [(7, 32, 4, 64, 64), (33, 128, 4, 64, 64), (1, 3, 1, 32, 16), (7, 3, 2, 32, 48), (513, 3, 3, 32, 24)]


@pytest.mark.parametrize("t,e,k,d,inter", MLP_CASES)
def test_moe_mlp_matches_oracle(t, e, k, d, inter):
    x, p = make_block(t, e, d, inter)
    out = ops.moe_mlp(x, *mlp_args(p), k=k)
    assert out.shape == (t, d) and out.dtype == torch.float32
    assert_close(out, ref_moe_mlp(x, *mlp_args(p), k=k), scale=4)
    assert_close(out, ref_moe_mlp(x.double(), *[a.double() for a in mlp_args(p)], k=k), torch.float32,
                 scale=4)


@pytest.mark.parametrize("dtype", LOW)
def test_moe_mlp_low_precision(dtype):
    # well-separated router logits, so that rounding cannot flip an expert choice
    t, e, k, d, inter = 40, 8, 3, 64, 96
    x, p = make_block(t, e, d, inter, gate_scale=30.0)
    top = torch.sort(torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"]), -1, descending=True).values
    keep = (top[:, k - 1] - top[:, k]) > 1.0
    x = x[keep]
    assert x.shape[0] >= 20
    xl, pl = x.to(dtype), {n: v.to(dtype) for n, v in p.items()}
    out = ops.moe_mlp(xl, *mlp_args(pl), k=k)
    oracle = ref_moe_mlp(xl.double(), *[a.double() for a in mlp_args(pl)], k=k)
    same_dtype = ref_moe_mlp(xl, *mlp_args(pl), k=k)
    # The activations between the two GEMMs are rounded to dtype (as in the reference): judge the
    # error against the reference run in dtype, which rounds after every op.
    assert_error_within(out, oracle, same_dtype)
    assert (out.double() - oracle).abs().max() < 0.05 * oracle.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 8, 40])
def test_moe_mlp_mxfp4_matches_dequantize_then_reference(dtype, t):
    e, k, d, inter = 8, 4, 64, 96
    x, p = make_block(t, e, d, inter, gate_scale=30.0 if dtype == torch.bfloat16 else 1.0)
    q1, q2 = ops.mxfp4_quantize(p["mlp1_weight"]), ops.mxfp4_quantize(p["mlp2_weight"])
    xl, pl = x.to(dtype), {n: v.to(dtype) for n, v in p.items()}
    out = ops.moe_mlp(xl, *mlp_args(pl, q1, q2), k=k)
    w1, w2 = (ops.mxfp4_dequantize(*q, dtype=torch.float64) for q in (q1, q2))
    # the oracle on the same rounded inputs and the decoded weights, with our routing decisions
    oracle = ref_moe_mlp(xl.double(), *[a.double() for a in mlp_args(pl, w1, w2)], k=k)
    routed_same = torch.equal(ops.moe_route(torch.nn.functional.linear(xl, pl["gate_weight"], pl["gate_bias"]), k)[1],
                              reference.moe_route(torch.nn.functional.linear(xl.double(), pl["gate_weight"].double(),
                                                                             pl["gate_bias"].double()), k)[1])
    assert routed_same
    if dtype == torch.float32:
        assert_close(out, oracle, dtype, scale=4)
    else:  # activations between the GEMMs are rounded to bf16 (as in the reference)
        assert_error_within(out, oracle, ref_moe_mlp(xl, *mlp_args(pl, q1, q2), k=k))


def mxfp4_ops_sequence(x, logits, k, q1, b1, q2, b2, alpha=1.702, limit=7.0):
    """moe_experts_mxfp4's contract: the op sequence it stands for."""
    weights, experts = ops.moe_route(logits, k)
    order, row_token, offsets = ops.moe_dispatch(experts, logits.shape[1])
    a = ops.moe_grouped_gemm(x, offsets, q1, b1, row_token, fused_swiglu=True, alpha=alpha, limit=limit)
    return ops.moe_combine(ops.moe_grouped_gemm(a, offsets, q2, b2), order, weights)


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16, 17])
@pytest.mark.parametrize("same_experts", [False, True])
def test_moe_experts_mxfp4_few_tokens(dtype, t, same_experts):
    # T <= 16 takes the CPU's fused decode path (T = 17 the op sequence). same_experts: every
    # token picks experts 0..3, so each selected expert gets T grouped rows.
    e, k, d, inter = 8, 4, 64, 96
    x, p = make_block(t, e, d, inter, gate_scale=30.0)
    if same_experts:
        p["gate_weight"] = p["gate_weight"] / 300  # logit noise ~0.1 around well-separated biases
        p["gate_bias"] = torch.tensor([4.0, 3.0, 2.0, 1.0] + [-4.0] * (e - 4))
    q1, q2 = ops.mxfp4_quantize(p["mlp1_weight"]), ops.mxfp4_quantize(p["mlp2_weight"])
    xl, pl = x.to(dtype), {n: v.to(dtype) for n, v in p.items()}
    logits = torch.nn.functional.linear(xl, pl["gate_weight"], pl["gate_bias"])
    experts = ops.moe_route(logits, k)[1]
    if same_experts:
        assert (experts == torch.arange(4, dtype=torch.int32)).all()
    outs = {}
    for n in (1, 2, 3):
        with threads(n):
            outs[n] = ops.moe_mlp(xl, *mlp_args(pl, q1, q2), k=k)
    assert outs[1].shape == (t, d) and outs[1].dtype == dtype
    if t <= 16:  # the fused path's split over threads does not change a bit
        assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[3])
    out = outs[2]
    assert_close(out, mxfp4_ops_sequence(xl, logits, k, q1, pl["mlp1_bias"], q2, pl["mlp2_bias"]), dtype)
    # the float64 oracle on the same rounded inputs and the decoded weights
    w1, w2 = (ops.mxfp4_dequantize(*q, dtype=torch.float64) for q in (q1, q2))
    oracle = ref_moe_mlp(xl.double(), *[a.double() for a in mlp_args(pl, w1, w2)], k=k)
    assert torch.equal(reference.moe_route(torch.nn.functional.linear(
        xl.double(), pl["gate_weight"].double(), pl["gate_bias"].double()), k)[1], experts)
    if dtype == torch.float32:
        assert_close(out, oracle, dtype, scale=4)
    else:  # activations between the GEMMs are rounded to dtype (as in the reference)
        assert_error_within(out, oracle, ref_moe_mlp(xl, *mlp_args(pl, q1, q2), k=k))


def test_moe_experts_mxfp4_no_clamp_and_real_width():
    # limit=None (no clamp), gpt-oss-20b widths d = I = 2880, 32 experts, 3 tokens. The float64
    # oracle decodes only the selected experts (decoding all 32 in the reference takes ~10 GB).
    t, e, k, d, inter = 3, 32, 4, 2880, 2880
    x = torch.randn(t, d).bfloat16()
    gate_w, gate_b = (torch.randn(e, d) / math.sqrt(d)).bfloat16(), torch.randn(e).bfloat16()
    q1, q2 = random_mxfp4(e, 2 * inter, d, 112, 116), random_mxfp4(e, d, inter, 112, 116)
    b1, b2 = torch.randn(e, 2 * inter).bfloat16(), torch.randn(e, d).bfloat16()
    logits = torch.nn.functional.linear(x, gate_w, gate_b)
    out = ops.moe_mlp(x, gate_w, gate_b, q1, b1, q2, b2, k=k, limit=None)
    assert_close(out, mxfp4_ops_sequence(x, logits, k, q1, b1, q2, b2, limit=math.inf), torch.bfloat16)
    weights, experts = reference.moe_route(logits.double(), k)
    oracle = torch.zeros(t, d, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            ex = int(experts[i, j])
            w1 = ops.mxfp4_dequantize(q1[0][ex], q1[1][ex], torch.float64)
            w2 = ops.mxfp4_dequantize(q2[0][ex], q2[1][ex], torch.float64)
            a = reference.swiglu(w1 @ x[i].double() + b1[ex].double(), 1.702, None)
            oracle[i] += weights[i, j] * (w2 @ a + b2[ex].double())
    assert_close(out, oracle, torch.bfloat16, scale=2)


def test_moe_experts_mxfp4_bad_input():
    t, e, k, d, inter = 3, 4, 2, 64, 32
    x = torch.randn(t, d)
    logits = torch.randn(t, e)
    q1, q2 = random_mxfp4(e, 2 * inter, d), random_mxfp4(e, d, inter)
    b1, b2 = torch.randn(e, 2 * inter), torch.randn(e, d)
    args = [x, logits, k, q1[0], q1[1], b1, q2[0], q2[1], b2, 1.702, 7.0]

    def call(**changes):
        a = list(args)
        for i, v in changes.items():
            a[int(i[1:])] = v
        return _ops.moe_experts_mxfp4(*a)

    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: k must be in"):
        call(a2=e + 1)
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: router_logits must have the dtype of x"):
        call(a1=logits.double())
    with pytest.raises(RuntimeError, match=r"moe_experts_mxfp4: router_logits must be \[T, E\]"):
        call(a1=logits[:2])
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: mlp1_scales must be"):
        call(a4=q1[1][:, :-1])
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: mlp2_bias must be"):
        call(a8=b2[:, :-1])
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: mlp1_blocks must be"):
        call(a3=q1[0][:3])
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: mlp2_blocks must be"):
        call(**dict(zip(("a6", "a7"), random_mxfp4(e, d, 2 * inter))))  # I/32 = 2 blocks, not 1
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: x must be Float/BFloat16/Half, got Double"):
        call(a0=x.double())
    with pytest.raises(RuntimeError, match="moe_experts_mxfp4: limit must be > 0"):
        call(a10=0.0)


def test_moe_mlp_real_size_mxfp4():
    # gpt-oss-20b expert shapes (E=32, d=I=2880), 7 tokens, MXFP4 weights
    t, e, k, d, inter = 7, 32, 4, 2880, 2880
    x = torch.randn(t, d)
    gate_w, gate_b = torch.randn(e, d) / math.sqrt(d), torch.randn(e)
    q1 = random_mxfp4(e, 2 * inter, d, 112, 116)
    q2 = random_mxfp4(e, d, inter, 112, 116)
    b1, b2 = torch.randn(e, 2 * inter), torch.randn(e, d)
    for dtype in (torch.bfloat16, torch.float32):
        args = [a.to(dtype) for a in (x, gate_w, gate_b)]
        out = ops.moe_mlp(args[0], args[1], args[2], q1, b1.to(dtype), q2, b2.to(dtype), k=k)
        ref = ref_moe_mlp(args[0].float(), args[1].float(), args[2].float(), q1, b1.to(dtype).float(), q2,
                                b2.to(dtype).float(), k=k)
        assert_close(out, ref, dtype, scale=2)


def test_moe_mlp_gradcheck():
    t, e, k, d, inter = 4, 5, 2, 6, 4
    x, p = make_block(t, e, d, inter, torch.float64)
    inputs = [x.requires_grad_()] + [a.requires_grad_() for a in mlp_args(p)]
    torch.autograd.gradcheck(lambda *a: ops.moe_mlp(*a, k=k, limit=50.0), inputs)
    torch.autograd.gradcheck(lambda *a: ops.moe_mlp(*a, k=k, limit=0.5), inputs, atol=1e-5)


def test_moe_mlp_grad_matches_oracle():
    t, e, k, d, inter = 29, 8, 4, 64, 48
    x, p = make_block(t, e, d, inter)
    a = [x.clone().requires_grad_()] + [v.clone().requires_grad_() for v in mlp_args(p)]
    b = [x.clone().requires_grad_()] + [v.clone().requires_grad_() for v in mlp_args(p)]
    g = torch.randn(t, d)
    ops.moe_mlp(*a, k=k).backward(g)
    ref_moe_mlp(*b, k=k).backward(g)
    names = ["x", "gate_weight", "gate_bias", "mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias"]
    for name, u, v in zip(names, a, b):
        assert u.grad is not None, name
        assert_close(u.grad, v.grad, scale=10)


def test_moe_mlp_mxfp4_backward_raises():
    x, p = make_block(3, 4, 32, 32)
    q1, q2 = ops.mxfp4_quantize(p["mlp1_weight"]), ops.mxfp4_quantize(p["mlp2_weight"])
    xr = x.requires_grad_()
    out = ops.moe_mlp(xr, *mlp_args(p, q1, q2), k=2)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_moe_mlp_compile_fullgraph():
    x, p = make_block(9, 8, 64, 32)
    compiled = torch.compile(lambda *a: ops.moe_mlp(*a, k=2), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, *mlp_args(p)), ops.moe_mlp(x, *mlp_args(p), k=2))
    q1, q2 = ops.mxfp4_quantize(p["mlp1_weight"]), ops.mxfp4_quantize(p["mlp2_weight"])
    with torch.no_grad():
        assert_close(compiled(x, *mlp_args(p, q1, q2)), ops.moe_mlp(x, *mlp_args(p, q1, q2), k=2))


# -------------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    t, e, k, d, m = 5, 4, 2, 32, 12
    experts, order, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, d)
    w = torch.randn(e, m, d)
    b = torch.randn(e, m)
    xg = torch.randn(t * k, d)
    blocks, scales = random_mxfp4(e, m, d)
    weights = torch.softmax(torch.randn(t, k), -1)
    y = torch.randn(t * k, d)
    h = torch.randn(3, 2 * 6)
    return [
        (_ops.moe_route, (torch.randn(t, e), k)),
        (_ops.moe_route_backward, (torch.randn(t, k), weights, experts, e)),
        (_ops.moe_dispatch, (experts, e)),
        (_ops.swiglu, (h, 1.702, 7.0)),
        (_ops.swiglu_backward, (torch.randn(3, 6), h, 1.702, 7.0)),
        (_ops.moe_grouped_gemm, (x, row_token, offsets, w, b, True, 1.702, 7.0)),
        (_ops.moe_grouped_gemm, (xg, None, offsets, w, None, False, 1.702, 7.0)),
        (_ops.moe_grouped_gemm_backward, (torch.randn(t * k, m), x, row_token, offsets, w, [True, True, True])),
        (_ops.moe_grouped_gemm_mxfp4, (x, row_token, offsets, blocks, scales, b, True, 1.702, 7.0)),
        (_ops.moe_combine, (y, order, weights)),
        (_ops.moe_combine_backward, (torch.randn(t, d), y, order, weights)),
        (_ops.mxfp4_dequantize, (blocks, scales, torch.bfloat16)),
        (_ops.mxfp4_quantize, (torch.randn(3, 64),)),
        (_ops.moe_experts_mxfp4, (x, torch.randn(t, e), k, *random_mxfp4(e, 64, d), torch.randn(e, 64),
                                  *random_mxfp4(e, d, 32), torch.randn(e, d), 1.702, 7.0)),
        (_ops.moe_experts_mxfp4, (torch.randn(20, d), torch.randn(20, e), k, *random_mxfp4(e, 64, d),
                                  torch.randn(e, 64), *random_mxfp4(e, d, 32), torch.randn(e, d), 1.702, 7.0)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_opcheck_with_grad():
    t, e, k, d, m = 5, 4, 2, 16, 12
    _, order, row_token, offsets = grouping(t, e, k)
    torch.library.opcheck(_ops.moe_route, (torch.randn(t, e, requires_grad=True), k))
    torch.library.opcheck(_ops.swiglu, (torch.randn(3, 12, requires_grad=True), 1.702, 7.0))
    torch.library.opcheck(_ops.moe_grouped_gemm, (torch.randn(t, d, requires_grad=True), row_token, offsets,
                                                  torch.randn(e, m, d, requires_grad=True),
                                                  torch.randn(e, m, requires_grad=True), True, 1.702, 7.0))
    torch.library.opcheck(_ops.moe_combine, (torch.randn(t * k, d, requires_grad=True), order,
                                             torch.rand(t, k, requires_grad=True)))


# ------------------------------------------------------------------------------ bad input

def test_bad_inputs_name_the_argument():
    t, e, k, d, m = 5, 4, 2, 64, 12
    _, order, row_token, offsets = grouping(t, e, k)
    x, w, b = torch.randn(t, d), torch.randn(e, m, d), torch.randn(e, m)
    cases = [
        (lambda: ops.moe_route(torch.randn(t, e), e + 1), r"moe_route: k must be in \[1, E\]"),
        (lambda: ops.moe_route(torch.randn(t, e), 0), r"moe_route: k must be in \[1, E\]"),
        (lambda: ops.moe_route(torch.randn(t), 1), r"moe_route: router_logits must be \[T, E\]"),
        (lambda: ops.moe_route(torch.randint(0, 3, (t, e)), 1), "moe_route: router_logits must be float32"),
        (lambda: ops.moe_dispatch(torch.zeros(t, k, dtype=torch.int64), e), "moe_dispatch: experts must be int32"),
        (lambda: ops.moe_dispatch(torch.zeros(t, k, dtype=torch.int32), 0), "moe_dispatch: num_experts must be >= 1"),
        (lambda: ops.swiglu(torch.randn(3, 5)), "swiglu: h must be .* even last dim"),
        (lambda: ops.swiglu(torch.randn(3, 4), limit=-1.0), "swiglu: limit must be > 0"),
        (lambda: ops.swiglu(torch.randn(3, 4), alpha=math.nan), "swiglu: alpha must be finite"),
        # wrong expert count: offsets has E+1 = 5 entries, weight 3 experts
        (lambda: ops.moe_grouped_gemm(x, offsets, w[:3], None, row_token), r"moe_grouped_gemm: offsets must be \[E\+1\]"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w[:, :, :32], None, row_token), "moe_grouped_gemm: weight must be"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w.double(), None, row_token),
         "moe_grouped_gemm: weight must have the dtype of x"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w, b[:, :5], row_token), r"moe_grouped_gemm: bias must be \[E, M\]"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w, b.double(), row_token), "moe_grouped_gemm: bias must have"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w[:, :11], None, row_token, fused_swiglu=True),
         "moe_grouped_gemm: fused_swiglu needs an even M"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w, None, row_token.long()), "moe_grouped_gemm: row_index must be int32"),
        (lambda: ops.moe_grouped_gemm(x, offsets, w, None, row_token + t), r"moe_grouped_gemm: row_index values must be in \[0, R\)"),
        (lambda: ops.moe_grouped_gemm(x, offsets.flip(0), w, None, row_token), "moe_grouped_gemm: offsets must run from 0 to N"),
        (lambda: ops.moe_grouped_gemm(x, torch.tensor([0, 6, 3, 8, 10], dtype=torch.int32), w, None, row_token),
         "moe_grouped_gemm: offsets must be nondecreasing"),
        (lambda: ops.moe_grouped_gemm(torch.randn(t, 48), offsets, random_mxfp4(e, m, 64), None, row_token),
         "moe_grouped_gemm_mxfp4: x's reduction dim K = 48 must be a multiple of 32"),
        (lambda: ops.moe_grouped_gemm(x.double(), offsets, random_mxfp4(e, m, 64), None, row_token),
         "moe_grouped_gemm_mxfp4: x must be"),
        (lambda: ops.moe_grouped_gemm(x, offsets, (random_mxfp4(e, m, 64)[0], random_mxfp4(e, m, 32)[1]), None,
                                      row_token), "moe_grouped_gemm_mxfp4: scales must be"),
        (lambda: ops.moe_grouped_gemm(torch.randn(t, 32), offsets, random_mxfp4(e, m, 64), None, row_token),
         "moe_grouped_gemm_mxfp4: blocks must be"),
        (lambda: ops.moe_combine(torch.randn(t * k, d), order, torch.rand(t, k + 1)),
         r"moe_combine: weights must be \[T, k\] with T\*k = N"),
        (lambda: ops.moe_combine(torch.randn(t * k, d), order.long(), torch.rand(t, k)), "moe_combine: order must be int32"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_moe_mlp_bad_shapes():
    x, p = make_block(3, 4, 32, 16)
    with pytest.raises(ValueError, match="moe_mlp: mlp1_weight must be"):
        ops.moe_mlp(x, p["gate_weight"], p["gate_bias"], p["mlp1_weight"][:3], p["mlp1_bias"], p["mlp2_weight"],
                    p["mlp2_bias"])
    with pytest.raises(ValueError, match="moe_mlp: gate_weight must be"):
        ops.moe_mlp(x, p["gate_weight"][:, :16], *mlp_args(p)[1:])
    with pytest.raises(RuntimeError, match=r"moe_route: k must be in \[1, E\]"):
        ops.moe_mlp(x, *mlp_args(p), k=5)


# ------------------------------------------------------------------------------ properties

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 9), inter=st.integers(1, 70), scale=st.sampled_from([0.1, 3.0, 30.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       limit=st.sampled_from([7.0, 0.3, None]), alpha=st.floats(0.1, 3.0), seed=st.integers(0, 2**31 - 1))
def test_swiglu_property(rows, inter, scale, dtype, limit, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * inter, generator=g) * scale).to(dtype)
    ref = reference.swiglu(h.double() if dtype == torch.float64 else h.float(), alpha, limit)
    assert_close(ops.swiglu(h, alpha, limit), ref, dtype)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(0, 40), e=st.integers(1, 40), data=st.data(), ties=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_route_property(t, e, data, ties, seed, dtype):
    k = data.draw(st.integers(1, e))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (t, e), generator=g).float() if ties else torch.randn(t, e, generator=g) * 4
    logits = logits.to(dtype)
    w, ex = ops.moe_route(logits, k)
    w_ref, ex_ref = reference.moe_route(logits, k)
    assert torch.equal(ex, ex_ref)
    assert_close(w, w_ref, w.dtype)
    order, row_token, offsets = ops.moe_dispatch(ex, e)
    for a, b in zip((order, row_token, offsets), dispatch_oracle(ex, e)):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 24), e=st.integers(1, 9), data=st.data(), d32=st.integers(1, 3), inter=st.integers(1, 40),
       mxfp4=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_moe_mlp_property(t, e, data, d32, inter, mxfp4, seed):
    k = data.draw(st.integers(1, e))
    torch.manual_seed(seed)
    d = 32 * d32
    if mxfp4:
        inter = 32 * max(1, inter // 32)
    x, p = make_block(t, e, d, inter)
    w1 = w2 = None
    if mxfp4:
        w1, w2 = ops.mxfp4_quantize(p["mlp1_weight"]), ops.mxfp4_quantize(p["mlp2_weight"])
    out = ops.moe_mlp(x, *mlp_args(p, w1, w2), k=k)
    assert_close(out, ref_moe_mlp(x, *mlp_args(p, w1, w2), k=k), scale=4)


# --------------------------------------------------------------- Hugging Face GptOssMLP

def hf_gpt_oss_mlp(p, k, dtype):
    """transformers' GptOssMLP (the pinned version) holding the same weights, in dtype. Its layout
    is [E, in, out] for the expert weights, ours (the OpenAI checkpoint's) [E, out, in]."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    e, two_i, d = p["mlp1_weight"].shape
    cfg = transformers.GptOssConfig(num_local_experts=e, num_experts_per_tok=k, hidden_size=d,
                                    intermediate_size=two_i // 2)
    cfg._experts_implementation = "eager"
    mlp = GptOssMLP(cfg).to(dtype)
    with torch.no_grad():
        mlp.router.weight.copy_(p["gate_weight"])
        mlp.router.bias.copy_(p["gate_bias"])
        mlp.experts.gate_up_proj.copy_(p["mlp1_weight"].transpose(1, 2))
        mlp.experts.gate_up_proj_bias.copy_(p["mlp1_bias"])
        mlp.experts.down_proj.copy_(p["mlp2_weight"].transpose(1, 2))
        mlp.experts.down_proj_bias.copy_(p["mlp2_bias"])
    return lambda x: mlp(x[None])[0][0]


def test_moe_mlp_equals_transformers_gpt_oss_mlp_fp32():
    t, e, k, d, inter = 37, 32, 4, 96, 64
    x, p = make_block(t, e, d, inter)
    hf = hf_gpt_oss_mlp(p, k, torch.float32)
    with torch.no_grad():
        expected = hf(x)
    out = ops.moe_mlp(x, *mlp_args(p), k=k)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_moe_mlp_equals_transformers_gpt_oss_mlp_bf16():
    # bf16 weights and input; router logits well separated so that rounding flips no expert choice.
    # Judge: our error vs transformers run in float64 on the same bf16 values is within 2x the error
    # of transformers' own bf16 run.
    t, e, k, d, inter = 64, 16, 4, 128, 96
    x, p = make_block(t, e, d, inter, gate_scale=30.0)
    top = torch.sort(torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"]), -1, descending=True).values
    x = x[(top[:, k - 1] - top[:, k]) > 1.0]
    assert x.shape[0] >= 30
    xl, pl = x.bfloat16(), {n: v.bfloat16() for n, v in p.items()}
    with torch.no_grad():
        hf64 = hf_gpt_oss_mlp({n: v.double() for n, v in pl.items()}, k, torch.float64)(xl.double())
        hf16 = hf_gpt_oss_mlp(pl, k, torch.bfloat16)(xl)
    out = ops.moe_mlp(xl, *mlp_args(pl), k=k)
    assert out.dtype == torch.bfloat16
    assert_error_within(out, hf64, hf16)
    # both bf16 runs land near 1.6% relative (activations rounded to bf16 between the GEMMs)
    assert ((out.double() - hf64).norm() / hf64.norm()).item() < 0.03


# ------------------------------------------------------------------------------ big grids

@pytest.mark.slow
@pytest.mark.parametrize("e", [32, 128])
@pytest.mark.parametrize("t", [1, 8, 64])
def test_slow_real_size_mxfp4_grid(e, t):
    # gpt-oss-20b / 120b expert counts at hidden 2880, MXFP4 weights, bf16 activations: every row
    # count path (direct kernel, tiled) against the float64 GEMM oracle per op
    d = inter = 2880
    _, order, row_token, offsets = grouping(t, e, 4)
    x = torch.randn(t, d).bfloat16()
    q1 = random_mxfp4(e, 2 * inter, d, 112, 116)
    b1 = torch.randn(e, 2 * inter).bfloat16()
    a = ops.moe_grouped_gemm(x, offsets, q1, b1, row_token, fused_swiglu=True)
    used = sorted({int(i) for i in torch.nonzero(offsets[1:] > offsets[:-1]).flatten()})
    # decoded weights held in bfloat16, where they are exact (2 significant bits, scales 2^-15..-12):
    # float64 for 128 experts would take 17 GB; gemm_oracle widens one expert at a time
    w1 = torch.zeros(e, 2 * inter, d, dtype=torch.bfloat16)
    for i in used:
        w1[i] = reference.mxfp4_dequantize(q1[0][i], q1[1][i], torch.float64).bfloat16()
    assert torch.equal(w1[used[0]].double(), reference.mxfp4_dequantize(q1[0][used[0]], q1[1][used[0]], torch.float64))
    assert_close(a, gemm_oracle(x, row_token, offsets, w1, b1, True), torch.bfloat16)


@pytest.mark.slow
def test_slow_prefill_dense_bf16():
    # T=512 prefill at gpt-oss-20b sizes with bf16 weights (the VNNI/brgemm path) vs float64
    t, e, k, d, inter = 512, 32, 4, 2880, 2880
    _, _, row_token, offsets = grouping(t, e, k)
    x = torch.randn(t, d).bfloat16()
    w1 = (torch.randn(e, 2 * inter, d) / 50).bfloat16()
    b1 = torch.randn(e, 2 * inter).bfloat16()
    a = ops.moe_grouped_gemm(x, offsets, w1, b1, row_token, fused_swiglu=True)
    assert_close(a, gemm_oracle(x, row_token, offsets, w1, b1, True), torch.bfloat16)


def test_mxfp4_shift_decode_bits_on_host(tmp_path):
    """The CUDA decode GEMV's shift decode (mxfp4_decode8_pow126_bf16, host/device code in
    common/moe_math.h) checked on the CPU: tests/cpp/mxfp4_decode8_pow126.cpp, built with the C++
    compiler that builds the extension, every nibble in every position and every scale byte."""
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "mxfp4_decode8_pow126"
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O2", f"-I{root / 'csrc'}",
                    str(root / "tests" / "cpp" / "mxfp4_decode8_pow126.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "mismatches: 0" in out.stdout, out.stdout
