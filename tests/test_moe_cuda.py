"""CUDA kernels of every MoE op (moe_route, moe_dispatch, swiglu, moe_grouped_gemm dense and MXFP4,
moe_combine, the MXFP4 codec, their backwards) against the float64 oracle (gptoss_ext.reference, or
float64 recomputations of the op contracts on the GPU) and against the CPU kernels (the contract),
plus opcheck on CUDA and moe_mlp gradients. Skipped without a GPU and a CUDA build; the CPU-kernel
comparisons are also skipped while the CPU MoE kernels are not in the build.

Inputs are made on the CPU in the kernel's dtype, then copied, so every backend sees the same values.
Sizes: gpt-oss 20b / 120b expert counts (E = 32 / 128, k = 4) with small hidden sizes, awkward sizes
(K not a multiple of 8 or 32, M not a multiple of the 128-column tile), and real sizes
(d = I = 2880, E = 32, T = 7 and T = 513: the decode and prefill regimes of the MXFP4 kernel).
"""
import math

import pytest
import torch

from conftest import assert_close, requires_cuda
from gptoss_ext import ops, reference

pytestmark = [requires_cuda, pytest.mark.cuda]

C = torch.ops.gptoss_ext
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALPHA, LIMIT = 1.702, 7.0


def _has_cpu_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gptoss_ext::{name}", "CPU")


requires_cpu_moe = pytest.mark.skipif(not _has_cpu_kernel("moe_grouped_gemm"),
                                      reason="CPU MoE kernels are not in this build")


def _routing(T, E, k, device="cpu"):
    """experts [T, k] int32 as moe_route would give (distinct per token), from random logits."""
    return torch.randn(T, E).topk(k, dim=-1).indices.to(torch.int32).to(device)


def _dispatch_oracle(experts, E):
    flat = experts.reshape(-1).long().cpu()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    return order.int(), (order // experts.shape[1]).int(), offsets.int()


def _close_to_oracle(actual, oracle64, dtype, scale=1.0):
    """actual vs a float64 oracle: the dtype's table tolerance (covers the output rounding)."""
    assert_close(actual, oracle64, dtype, scale=scale)


# ------------------------------------------------------------------------------------ moe_route

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T,E,k", [(37, 32, 4), (9, 128, 4), (5, 128, 1), (3, 7, 7), (1, 200, 5), (0, 32, 4)])
def test_route_matches_oracle(T, E, k, dtype):
    logits = torch.randn(T, E).to(dtype)
    w, ex = C.moe_route(logits.to(DEV), k)
    w_ref, ex_ref = reference.moe_route(logits, k)
    assert ex.dtype == torch.int32 and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ex.cpu(), ex_ref)
    assert_close(w, w_ref, w_ref.dtype)
    if T:
        assert_close(w.sum(-1), torch.ones(T, dtype=w.dtype), w.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_ties_nan_and_signed_zero(dtype):
    # few distinct values: many exact ties, broken by the lower index as the stable sort does
    logits = torch.randint(-2, 3, (64, 32)).to(dtype)
    logits[3, 5] = logits[3, 17] = float("nan")  # NaN sorts first, lower index first
    logits[4] = 0.0
    logits[4, ::3] = -0.0  # -0 == +0: a tie
    logits[5] = float("-inf")
    logits[5, 30] = float("inf")
    w, ex = C.moe_route(logits.to(DEV), 4)
    w_ref, ex_ref = reference.moe_route(logits, 4)
    assert torch.equal(ex.cpu(), ex_ref)
    assert ex[3, 0].item() == 5 and ex[3, 1].item() == 17
    torch.testing.assert_close(w.cpu(), w_ref, equal_nan=True, atol=2e-6, rtol=2e-6)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_cpu(dtype):
    logits = torch.randint(-4, 5, (300, 128)).to(dtype) + torch.randn(300, 128).to(dtype) * 0.01
    w, ex = C.moe_route(logits.to(DEV), 4)
    w_cpu, ex_cpu = C.moe_route(logits, 4)
    assert torch.equal(ex.cpu(), ex_cpu)
    assert_close(w, w_cpu, torch.float32)


def test_route_backward_matches_oracle_autograd():
    logits = torch.randn(33, 32, dtype=torch.float64)
    g = torch.randn(33, 4, dtype=torch.float64)
    lc = logits.to(DEV).requires_grad_()
    w, _ = ops.moe_route(lc, 4)
    w.backward(g.to(DEV))
    lr = logits.clone().requires_grad_()
    reference.moe_route(lr, 4)[0].backward(g)
    assert_close(lc.grad, lr.grad, torch.float64)
    # the Jacobian of a softmax: each row of the gradient sums to 0, unselected logits get 0
    assert lc.grad.sum(-1).abs().max() < 1e-12
    assert (lc.grad != 0).sum(-1).max() <= 4


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_route_backward_kernel(gdtype):
    T, E, k = 50, 128, 4
    w = torch.softmax(torch.randn(T, k), -1)
    ex = _routing(T, E, k)
    g = torch.randn(T, k).to(gdtype)
    got = C.moe_route_backward(g.to(DEV), w.to(DEV), ex.to(DEV), E)
    gf = g.float()
    val = w * (gf - (w * gf).sum(-1, keepdim=True))
    expect = torch.zeros(T, E).scatter_(1, ex.long(), val)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    assert_close(got, expect, torch.float32)


def test_route_gradcheck_cuda():
    logits = torch.randn(6, 9, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.moe_route(x, 3)[0], (logits,))


# --------------------------------------------------------------------------------- moe_dispatch

@pytest.mark.parametrize("T,E,k", [(37, 32, 4), (100, 128, 4), (1, 32, 4), (0, 32, 4), (5000, 32, 4),
                                   (70000, 128, 4), (3, 1, 1), (257, 3, 2)])
def test_dispatch_matches_stable_sort(T, E, k):
    experts = _routing(T, E, k) if k <= E and T else torch.randint(0, E, (T, k), dtype=torch.int32)
    order, row_token, offsets = C.moe_dispatch(experts.to(DEV), E)
    o_ref, r_ref, off_ref = _dispatch_oracle(experts, E)
    assert order.dtype == row_token.dtype == offsets.dtype == torch.int32
    assert torch.equal(order.cpu(), o_ref) and torch.equal(row_token.cpu(), r_ref)
    assert torch.equal(offsets.cpu(), off_ref)


def test_dispatch_skewed_and_empty_experts():
    T, E = 4096, 128
    experts = torch.full((T, 4), 7, dtype=torch.int32)  # every slot to one expert (duplicates allowed here)
    experts[::5, 1] = 127
    order, row_token, offsets = C.moe_dispatch(experts.to(DEV), E)
    o_ref, r_ref, off_ref = _dispatch_oracle(experts, E)
    assert torch.equal(order.cpu(), o_ref) and torch.equal(offsets.cpu(), off_ref)
    assert (offsets[1:] - offsets[:-1] == 0).sum().item() == E - 2


def test_dispatch_out_of_range_ids_are_flagged():
    # A device kernel cannot raise without a sync: bad slots go last and offsets[E] < N says so.
    T, E, k = 40, 8, 2
    experts = _routing(T, E, k)
    experts[3, 1] = 8
    experts[20, 0] = -1
    order, row_token, offsets = C.moe_dispatch(experts.to(DEV), E)
    n_valid = T * k - 2
    assert offsets[-1].item() == n_valid
    assert order[n_valid:].tolist() == [3 * k + 1, 20 * k + 0]
    assert sorted(order.tolist()) == list(range(T * k))  # still a permutation
    valid = torch.ones(T * k, dtype=torch.bool)
    valid[[3 * k + 1, 20 * k]] = False
    flat = experts.reshape(-1).long()
    o_ref = torch.nonzero(valid).reshape(-1)[torch.sort(flat[valid], stable=True).indices]
    assert torch.equal(order[:n_valid].cpu(), o_ref.int())


@requires_cpu_moe
def test_dispatch_matches_cpu():
    experts = _routing(513, 32, 4)
    for a, b in zip(C.moe_dispatch(experts.to(DEV), 32), C.moe_dispatch(experts, 32)):
        assert torch.equal(a.cpu(), b)


# --------------------------------------------------------------------------------------- swiglu

def _swiglu_oracle(h, limit):
    return reference.swiglu(h.double(), ALPHA, None if math.isinf(limit) else limit)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(7, 5760), (3, 4, 18), (1, 2), (5, 34)])
@pytest.mark.parametrize("limit", [LIMIT, math.inf])
def test_swiglu_matches_oracle(shape, dtype, limit):
    h = (torch.randn(shape) * 6).to(dtype)  # reaches past +-limit on both branches
    out = C.swiglu(h.to(DEV), ALPHA, limit)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    _close_to_oracle(out, _swiglu_oracle(h, limit), dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_swiglu_backward_matches_oracle(dtype):
    h = (torch.randn(9, 130) * 6).to(dtype)
    h[0, :4] = torch.tensor([7.0, 7.0, -7.0, 8.0]).to(dtype)  # glu and lin exactly at +limit, glu at -limit
    g = torch.randn(9, 65).to(dtype)
    got = C.swiglu_backward(g.to(DEV), h.to(DEV), ALPHA, LIMIT)
    hr = h.double().requires_grad_()
    reference.swiglu(hr, ALPHA, LIMIT).backward(g.double())
    # The op's contract (moe_math.h): an input exactly at a clamp bound gets gradient 0, as
    # torch.clamp's backward gives in torch 2.14; torch 2.11's passed it, so the oracle is pinned here.
    at_bound = torch.zeros(h.shape, dtype=torch.bool)
    at_bound[:, 0::2] = h[:, 0::2].double() == LIMIT  # glu: clamped above only
    at_bound[:, 1::2] = h[:, 1::2].double().abs() == LIMIT  # (bf16/fp16 draws hit +-7 too)
    assert at_bound[0, :2].all()
    expect = torch.where(at_bound, torch.zeros_like(hr.grad), hr.grad)
    assert got[0, 2].item() != 0  # glu = -limit is not clamped (glu is clamped above only)
    _close_to_oracle(got, expect, dtype, scale=2)


def test_swiglu_unaligned_and_noncontiguous():
    base = torch.randn(2 * 6 * 22 + 1).bfloat16().to(DEV)
    h = base[1:].view(12, 22)  # data pointer off the 16-byte grid: scalar path
    assert h.data_ptr() % 16 != 0
    _close_to_oracle(C.swiglu(h, ALPHA, LIMIT), _swiglu_oracle(h.cpu(), LIMIT), torch.bfloat16)
    ht = torch.randn(8, 12, dtype=torch.float32, device=DEV).t()  # [12, 8], not contiguous
    _close_to_oracle(C.swiglu(ht, ALPHA, LIMIT), _swiglu_oracle(ht.cpu(), LIMIT), torch.float32)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_cpu(dtype):
    h = (torch.randn(33, 2 * 2880) * 5).to(dtype)
    g = torch.randn(33, 2880).to(dtype)
    assert_close(C.swiglu(h.to(DEV), ALPHA, LIMIT), C.swiglu(h, ALPHA, LIMIT), dtype)
    assert_close(C.swiglu_backward(g.to(DEV), h.to(DEV), ALPHA, LIMIT), C.swiglu_backward(g, h, ALPHA, LIMIT), dtype)


# ----------------------------------------------------------------------------- grouped GEMM

def _gemm_case(T, E, k, K, M, dtype, with_ri=True, routing=None, bias=True):
    """x [T, K], grouping from moe_dispatch of a routing, weight [E, M, K] ~ 1/sqrt(K), bias [E, M]."""
    experts = _routing(T, E, k) if routing is None else routing
    order, row_token, offsets = _dispatch_oracle(experts, E)
    x = torch.randn(T if with_ri else T * k, K).to(dtype)
    w = (torch.randn(E, M, K) / math.sqrt(K)).to(dtype)
    b = torch.randn(E, M).to(dtype) if bias else None
    return x, (row_token if with_ri else None), offsets, w, b


def _gemm_oracle(x, ri, offsets, w64, b, fused, limit=LIMIT):
    """float64 on w64's device: out[r] = act(W_e x[ri[r]] + b_e)."""
    dev = w64.device
    rows = x.to(dev).double()
    if ri is not None:
        rows = rows[ri.to(dev).long()]
    offs = offsets.tolist()
    h = torch.empty(rows.shape[0], w64.shape[1], dtype=torch.float64, device=dev)
    for e in range(w64.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            h[lo:hi] = rows[lo:hi] @ w64[e].t() + (b[e].to(dev).double() if b is not None else 0)
    return reference.swiglu(h, ALPHA, limit) if fused else h


def _to(dev, *ts):
    return [t.to(dev) if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T,E,k,K,M", [(37, 32, 4, 64, 96), (21, 128, 4, 32, 64), (300, 32, 4, 96, 200),
                                       (9, 4, 2, 40, 18), (130, 2, 1, 264, 260)])
def test_grouped_gemm_matches_oracle(T, E, k, K, M, dtype, fused):
    x, ri, offsets, w, b = _gemm_case(T, E, k, K, M, dtype)
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets, w, b), fused, ALPHA, LIMIT)
    expect = _gemm_oracle(x, ri, offsets, w.double().to(DEV), b, fused)
    assert out.dtype == dtype and out.shape == expect.shape
    _close_to_oracle(out, expect, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_identity_rows_and_no_bias(dtype):
    x, ri, offsets, w, b = _gemm_case(40, 8, 2, 48, 70, dtype, with_ri=False, bias=False)
    out = C.moe_grouped_gemm(*_to(DEV, x, None, offsets, w, None), False, ALPHA, LIMIT)
    _close_to_oracle(out, _gemm_oracle(x, None, offsets, w.double().to(DEV), None, False), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_skewed_routing(dtype):
    # every token to expert 3 (and one other expert per token): one expert owns most row tiles
    T, E = 700, 32
    routing = torch.stack([torch.full((T,), 3), (torch.arange(T) % 31 + 4) % 32], -1).to(torch.int32)
    x, ri, offsets, w, b = _gemm_case(T, E, 2, 128, 256, dtype, routing=routing)
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets, w, b), True, ALPHA, LIMIT)
    _close_to_oracle(out, _gemm_oracle(x, ri, offsets, w.double().to(DEV), b, True), dtype)


def test_grouped_gemm_unaligned_falls_back():
    # K = 45 (not a multiple of 8) and an x whose data pointer is off the 16-byte grid: SIMT path
    x, ri, offsets, w, b = _gemm_case(30, 4, 2, 45, 50, torch.bfloat16)
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets, w, b), False, ALPHA, LIMIT)
    _close_to_oracle(out, _gemm_oracle(x, ri, offsets, w.double().to(DEV), b, False), torch.bfloat16)
    x2 = torch.randn(30 * 64 + 1).bfloat16().to(DEV)[1:].view(30, 64)
    _, ri2, off2, w2, b2 = _gemm_case(30, 4, 2, 64, 50, torch.bfloat16)
    out2 = C.moe_grouped_gemm(x2, *_to(DEV, ri2, off2, w2, b2), True, ALPHA, LIMIT)
    _close_to_oracle(out2, _gemm_oracle(x2.cpu(), ri2, off2, w2.double().to(DEV), b2, True), torch.bfloat16)


@pytest.mark.parametrize("T", [7, 513])
@pytest.mark.parametrize("fused", [True, False])
def test_grouped_gemm_real_size(T, fused):
    d = I = 2880
    E, k = 32, 4
    M, K = (2 * I, d) if fused else (d, I)
    x, ri, offsets, _, _ = _gemm_case(T, E, k, K, 2, torch.bfloat16, with_ri=fused, bias=False)
    w_dev = (torch.randn(E, M, K, device=DEV) / math.sqrt(K)).bfloat16()  # 1 GB: made on the GPU
    b_dev = torch.randn(E, M, device=DEV).bfloat16()
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets), w_dev, b_dev, fused, ALPHA, LIMIT)
    _close_to_oracle(out, _gemm_oracle(x, ri, offsets, w_dev.double(), b_dev, fused), torch.bfloat16)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_gemm_matches_cpu(dtype, fused):
    x, ri, offsets, w, b = _gemm_case(65, 32, 4, 96, 136, dtype)
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets, w, b), fused, ALPHA, LIMIT)
    out_cpu = C.moe_grouped_gemm(x, ri, offsets, w, b, fused, ALPHA, LIMIT)
    # the CPU 16-bit path rounds the GEMM before the epilogue, CUDA once at the end
    assert_close(out, out_cpu, dtype, scale=2)


def test_grouped_gemm_bad_grouping_gives_nan_rows():
    # row_index out of range and offsets ending before N: no crash, NaN rows (the CPU raises)
    x, ri, offsets, w, b = _gemm_case(20, 4, 2, 32, 16, torch.bfloat16)
    ri = ri.clone()
    ri[5] = 1000
    offsets = offsets.clone()
    offsets[-1] -= 3
    out = C.moe_grouped_gemm(*_to(DEV, x, ri, offsets, w, b), False, ALPHA, LIMIT).cpu()
    assert torch.isnan(out[5]).all() and torch.isnan(out[-3:]).all()
    good = torch.ones(out.shape[0], dtype=torch.bool)
    good[5] = False
    good[-3:] = False
    assert torch.isfinite(out[good]).all()


# -------------------------------------------------------------------------- grouped GEMM backward

def _gemm_backward_oracle(g, x, ri, offsets, w):
    """float64 autograd of the unfused grouped GEMM (without bias: the bias gradient is separate)."""
    xr = x.double().to(DEV).requires_grad_()
    wr = w.double().to(DEV).requires_grad_()
    br = torch.zeros(w.shape[0], w.shape[1], dtype=torch.float64, device=DEV, requires_grad=True)
    rows = xr[ri.to(DEV).long()] if ri is not None else xr
    offs = offsets.tolist()
    outs = []
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        outs.append(rows[lo:hi] @ wr[e].t() + br[e])
    torch.cat(outs).backward(g.double().to(DEV))
    return xr.grad, wr.grad, br.grad


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("with_ri", [True, False])
def test_grouped_gemm_backward_matches_oracle(dtype, with_ri):
    x, ri, offsets, w, _ = _gemm_case(45, 32, 4, 72, 66, dtype, with_ri=with_ri)
    g = torch.randn(offsets[-1].item(), 66).to(dtype)
    gx, gw, gb = C.moe_grouped_gemm_backward(*_to(DEV, g, x, ri, offsets, w), [True, True, True])
    ex, ew, eb = _gemm_backward_oracle(g, x, ri, offsets, w)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (32, 66)
    # sums of up to k * T products: allow the float32-accumulation growth on top of one rounding
    _close_to_oracle(gx, ex, dtype, scale=4)
    _close_to_oracle(gw, ew, dtype, scale=4)
    _close_to_oracle(gb, eb, dtype, scale=4)
    assert gw[(offsets[1:] - offsets[:-1] == 0).nonzero().reshape(-1)].abs().sum() == 0  # empty experts: 0


def test_grouped_gemm_backward_mask_and_empty():
    x, ri, offsets, w, _ = _gemm_case(10, 4, 2, 16, 8, torch.float32)
    g = torch.randn(20, 8)
    gx, gw, gb = C.moe_grouped_gemm_backward(*_to(DEV, g, x, ri, offsets, w), [True, False, False])
    assert gw.numel() == 0 and gb.numel() == 0 and gx.shape == x.shape
    # N = 0: zeros, not garbage
    x0 = torch.randn(5, 16, device=DEV)
    ri0 = torch.zeros(0, dtype=torch.int32, device=DEV)
    off0 = torch.zeros(5, dtype=torch.int32, device=DEV)
    gx0, gw0, gb0 = C.moe_grouped_gemm_backward(torch.zeros(0, 8, device=DEV), x0, ri0, off0, w.to(DEV),
                                                [True, True, True])
    assert gx0.abs().sum() == 0 and gw0.abs().sum() == 0 and gb0.abs().sum() == 0


def test_grouped_gemm_gradcheck_cuda():
    x, ri, offsets, w, b = _gemm_case(6, 3, 2, 5, 4, torch.float64)
    args = [t.requires_grad_() if t.is_floating_point() else t for t in _to(DEV, x, ri, offsets, w, b)]
    f = lambda xx, ww, bb: ops.moe_grouped_gemm(xx, args[2], ww, bb, args[1], fused_swiglu=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (args[0], args[3], args[4]))


@requires_cpu_moe
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_backward_matches_cpu(dtype):
    x, ri, offsets, w, _ = _gemm_case(33, 32, 4, 40, 24, dtype)
    g = torch.randn(132, 24).to(dtype)
    got = C.moe_grouped_gemm_backward(*_to(DEV, g, x, ri, offsets, w), [True, True, True])
    cpu = C.moe_grouped_gemm_backward(g, x, ri, offsets, w, [True, True, True])
    for a, c in zip(got, cpu):
        assert_close(a, c, dtype, scale=4)


# --------------------------------------------------------------------------------- MXFP4 GEMM

def _mxfp4_weight(E, M, K, scale_lo=119, scale_hi=124, device="cpu"):
    """Random blocks holding every byte value (a shuffled tiling of 0..255 for small weights, uniform
    bytes for big ones) and scales in [scale_lo, scale_hi]."""
    n = E * M * (K // 32) * 16
    if n <= 1 << 22:
        bytes_ = torch.arange(256, dtype=torch.uint8).repeat(-(-n // 256))[:n][torch.randperm(n)].to(device)
    else:
        bytes_ = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    blocks = bytes_.view(E, M, K // 32, 16)
    scales = torch.randint(scale_lo, scale_hi + 1, (E, M, K // 32), dtype=torch.uint8, device=device)
    return blocks, scales


def _mxfp4_case(T, E, k, K, M, dtype, with_ri=True, routing=None):
    x, ri, offsets, _, b = _gemm_case(T, E, k, K, 2, dtype, with_ri=with_ri, routing=routing, bias=False)
    blocks, scales = _mxfp4_weight(E, M, K)
    b = torch.randn(E, M).to(dtype)
    return x, ri, offsets, blocks, scales, b


def _mxfp4_oracle(x, ri, offsets, blocks, scales, b, fused):
    """_gemm_oracle with the weights dequantized to float64 one expert at a time (on the GPU)."""
    rows = x.to(DEV).double()
    if ri is not None:
        rows = rows[ri.to(DEV).long()]
    offs = offsets.tolist()
    h = torch.empty(rows.shape[0], blocks.shape[1], dtype=torch.float64, device=DEV)
    for e in range(blocks.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            w64 = reference.mxfp4_dequantize(blocks[e].to(DEV), scales[e].to(DEV), torch.float64)
            h[lo:hi] = rows[lo:hi] @ w64.t() + (b[e].to(DEV).double() if b is not None else 0)
    return reference.swiglu(h, ALPHA, LIMIT) if fused else h


# (T, E, k) covering both regimes of the bfloat16 kernel (decode GEMV: N <= 32 E with 8, 16 and
# 32 tokens per pass; prefill tensor cores: N > 32 E) and the SIMT path of the other dtypes.
MX_CASES = [(1, 32, 4), (16, 32, 4), (50, 8, 2), (37, 4, 2), (60, 4, 2), (150, 4, 1), (300, 8, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T,E,k", MX_CASES)
def test_grouped_gemm_mxfp4_matches_oracle(T, E, k, dtype, fused):
    x, ri, offsets, blocks, scales, b = _mxfp4_case(T, E, k, 96, 160, dtype)
    out = C.moe_grouped_gemm_mxfp4(*_to(DEV, x, ri, offsets, blocks, scales, b), fused, ALPHA, LIMIT)
    expect = _mxfp4_oracle(x, ri, offsets, blocks, scales, b, fused)
    assert out.dtype == dtype and out.shape == expect.shape
    _close_to_oracle(out, expect, dtype)


@pytest.mark.parametrize("K,M", [(32, 18), (352, 130), (2880, 72)])
def test_grouped_gemm_mxfp4_awkward_sizes(K, M):
    for T, E in ((5, 4), (200, 2)):  # decode and prefill regimes
        x, ri, offsets, blocks, scales, b = _mxfp4_case(T, E, 2, K, M, torch.bfloat16)
        out = C.moe_grouped_gemm_mxfp4(*_to(DEV, x, ri, offsets, blocks, scales, b), True, ALPHA, LIMIT)
        _close_to_oracle(out, _mxfp4_oracle(x, ri, offsets, blocks, scales, b, True), torch.bfloat16)


def test_grouped_gemm_mxfp4_wide_scales():
    # scale bytes 2..252 (all exact in bfloat16); x scaled so that products stay finite
    E, M, K = 2, 40, 64
    blocks, _ = _mxfp4_weight(E, M, K)
    scales = torch.randint(2, 253, (E, M, K // 32), dtype=torch.uint8)
    for T in (3, 100):
        x, ri, offsets, _, _ = _gemm_case(T, E, 1, K, 2, torch.bfloat16, bias=False)
        x = (x.float() * 2.0 ** -70).bfloat16()
        out = C.moe_grouped_gemm_mxfp4(*_to(DEV, x, ri, offsets, blocks, scales), None, False, ALPHA, LIMIT)
        w64 = reference.mxfp4_dequantize(blocks.to(DEV), scales.to(DEV), torch.float64)
        expect = _gemm_oracle(x, ri, offsets, w64, None, False)
        finite = torch.isfinite(expect)
        torch.testing.assert_close(out.double()[finite], expect[finite], rtol=1.6e-2, atol=1e-30)


@pytest.mark.parametrize("T", [7, 513])
def test_grouped_gemm_mxfp4_real_size(T):
    # mlp1 (fused SwiGLU, gathered rows) then mlp2 on the result, gpt-oss-20b shapes
    d = I = 2880
    E, k = 32, 4
    x, ri, offsets, _, _ = _gemm_case(T, E, k, d, 2, torch.bfloat16, bias=False)
    b1, b2 = torch.randn(E, 2 * I).bfloat16(), torch.randn(E, d).bfloat16()
    bl1, sc1 = _mxfp4_weight(E, 2 * I, d, 119, 122, DEV)
    bl2, sc2 = _mxfp4_weight(E, d, I, 119, 122, DEV)
    a = C.moe_grouped_gemm_mxfp4(*_to(DEV, x, ri, offsets, bl1, sc1, b1), True, ALPHA, LIMIT)
    _close_to_oracle(a, _mxfp4_oracle(x, ri, offsets, bl1, sc1, b1, True), torch.bfloat16)
    y = C.moe_grouped_gemm_mxfp4(a, None, *_to(DEV, offsets, bl2, sc2, b2), False, ALPHA, LIMIT)
    _close_to_oracle(y, _mxfp4_oracle(a.cpu(), None, offsets, bl2, sc2, b2, False), torch.bfloat16)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [9, 300])
def test_grouped_gemm_mxfp4_matches_cpu(dtype, T):
    x, ri, offsets, blocks, scales, b = _mxfp4_case(T, 8, 4, 128, 96, dtype)
    got = C.moe_grouped_gemm_mxfp4(*_to(DEV, x, ri, offsets, blocks, scales, b), True, ALPHA, LIMIT)
    cpu = C.moe_grouped_gemm_mxfp4(x, ri, offsets, blocks, scales, b, True, ALPHA, LIMIT)
    assert_close(got, cpu, dtype, scale=2)


# ------------------------------------------------------------------------------------ combine

def _combine_oracle(y, order, weights, k):
    inv = torch.empty_like(order)
    inv[order.long()] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    T = weights.shape[0]
    rows = y.double()[inv.long()].view(T, k, y.shape[-1])
    return (rows * weights.double().unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T,E,k,d", [(37, 32, 4, 2880), (5, 128, 4, 40), (11, 8, 1, 7), (0, 4, 2, 16)])
def test_combine_matches_oracle(T, E, k, d, dtype):
    order = _dispatch_oracle(_routing(T, E, k), E)[0] if T else torch.zeros(0, dtype=torch.int32)
    y = torch.randn(T * k, d).to(dtype)
    w = torch.softmax(torch.randn(T, k), -1)
    out = C.moe_combine(*_to(DEV, y, order, w))
    assert out.dtype == dtype and out.shape == (T, d)
    _close_to_oracle(out, _combine_oracle(y, order, w, k), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_combine_backward_matches_oracle(dtype):
    T, E, k, d = 21, 32, 4, 72
    order = _dispatch_oracle(_routing(T, E, k), E)[0]
    y = torch.randn(T * k, d).to(dtype)
    w = torch.softmax(torch.randn(T, k), -1).to(dtype)
    g = torch.randn(T, d).to(dtype)
    gy, gw = C.moe_combine_backward(*_to(DEV, g, y, order, w))
    yr, wr = y.double().requires_grad_(), w.double().requires_grad_()
    _combine_oracle(yr, order, wr, k).backward(g.double())
    assert gy.dtype == dtype and gw.dtype == dtype
    _close_to_oracle(gy, yr.grad, dtype)
    _close_to_oracle(gw, wr.grad, dtype, scale=4)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_matches_cpu(dtype):
    T, E, k, d = 50, 32, 4, 2880
    order = _dispatch_oracle(_routing(T, E, k), E)[0]
    y = torch.randn(T * k, d).to(dtype)
    w = torch.softmax(torch.randn(T, k), -1)
    g = torch.randn(T, d).to(dtype)
    assert_close(C.moe_combine(*_to(DEV, y, order, w)), C.moe_combine(y, order, w), dtype)
    for a, c in zip(C.moe_combine_backward(*_to(DEV, g, y, order, w)), C.moe_combine_backward(g, y, order, w)):
        assert_close(a, c, a.dtype if a.dtype != torch.float32 else torch.float32, scale=2)


# --------------------------------------------------------------------------------- MXFP4 codec

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_every_byte_and_scale_bit_exact(dtype):
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(256, 1, 1)  # [256 scales, 16 blocks, 16]
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).repeat(1, 16)
    got = C.mxfp4_dequantize(blocks.to(DEV), scales.to(DEV), dtype).cpu()
    expect = reference.mxfp4_dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == expect.shape
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    assert torch.equal(got.view(bits[dtype]), expect.view(bits[dtype]))  # bit-exact, -0 and inf included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_matches_oracle(dtype):
    w = torch.randn(64, 320) * torch.logspace(-30, 30, 64).unsqueeze(-1)
    w = w.to(dtype)
    w = torch.where(w.isfinite(), w, torch.zeros_like(w))  # float16 overflows above 65504
    w[0, :32] = 0  # all-zero block
    w[1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4).to(dtype)  # exact ties
    w[2, :32] = torch.tensor([6.0] + [0.0] * 31).to(dtype)
    if dtype in (torch.float32, torch.float64):
        w[3, :32] = torch.randn(32).to(dtype) * 2.0 ** -140  # subnormal floats: clamped scale 2^-127
    b, s = C.mxfp4_quantize(w.to(DEV))
    b_ref, s_ref = reference.mxfp4_quantize(w)
    assert b.dtype == s.dtype == torch.uint8 and b.shape == b_ref.shape and s.shape == s_ref.shape
    assert torch.equal(s.cpu(), s_ref) and torch.equal(b.cpu(), b_ref)


def test_quantize_roundtrip_on_grid():
    blocks, scales = _mxfp4_weight(3, 20, 256, 100, 150)
    blocks, scales = reference.mxfp4_quantize(reference.mxfp4_dequantize(blocks, scales, torch.float32))  # canonical
    w = C.mxfp4_dequantize(blocks.to(DEV), scales.to(DEV), torch.float32)
    b2, s2 = C.mxfp4_quantize(w)
    assert torch.equal(b2.cpu(), blocks) and torch.equal(s2.cpu(), scales)


def test_quantize_non_finite_is_marked():
    w = torch.randn(2, 64, device=DEV)
    w[1, 40] = float("nan")
    _, s = C.mxfp4_quantize(w)
    assert s[1, 1].item() == 255 and (s[0] != 255).all() and s[1, 0].item() != 255


# ------------------------------------------------------------------------------ full MoE block

def _moe_params(E, d, I, dtype):
    gw, gb = torch.randn(E, d) / math.sqrt(d), torch.randn(E) * 0.1
    w1, b1 = torch.randn(E, 2 * I, d) / math.sqrt(d), torch.randn(E, 2 * I) * 0.1
    w2, b2 = torch.randn(E, d, I) / math.sqrt(I), torch.randn(E, d) * 0.1
    return [t.to(dtype) for t in (gw, gb, w1, b1, w2, b2)]


def test_moe_mlp_float64_grads_match_reference():
    T, E, d, I = 13, 32, 24, 20
    x = torch.randn(T, d, dtype=torch.float64)
    params = _moe_params(E, d, I, torch.float64)
    dev_in = [t.to(DEV).requires_grad_() for t in [x] + params]
    out = ops.moe_mlp(*dev_in, k=4)
    g = torch.randn(T, d, dtype=torch.float64)
    out.backward(g.to(DEV))
    ref_in = [t.clone().requires_grad_() for t in [x] + params]
    out_ref = reference.moe_mlp(*ref_in, k=4)
    out_ref.backward(g)
    assert_close(out, out_ref, torch.float64)
    for a, r in zip(dev_in, ref_in):
        assert_close(a.grad, r.grad, torch.float64)


@requires_cpu_moe
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moe_mlp_grads_match_cpu(dtype):
    # (not bfloat16: CPU and cuBLAS logits may round differently and route a token differently)
    T, E, d, I = 40, 32, 64, 48
    x = torch.randn(T, d).to(dtype)
    params = _moe_params(E, d, I, dtype)
    g = torch.randn(T, d).to(dtype)
    outs, grads = [], []
    for dev in ("cpu", DEV):
        inp = [t.detach().to(dev).requires_grad_() for t in [x] + params]
        out = ops.moe_mlp(*inp, k=4)
        out.backward(g.to(dev))
        outs.append(out)
        grads.append([t.grad for t in inp])
    assert_close(outs[1], outs[0], dtype, scale=2)
    for a, c in zip(grads[1], grads[0]):
        assert_close(a, c, dtype, scale=8)


@pytest.mark.parametrize("T", [1, 7, 513])
def test_moe_mlp_mxfp4_real_size_matches_reference(T):
    # The whole block on native ops (gpt-oss-20b shapes, MXFP4 experts) against a float64 recomputation
    # with the same routing (the routing of bf16 logits is itself checked by the moe_route tests).
    # T = 1 is a decode step: the four-launch path, mlp2 on the two-K-part GEMV CTAs.
    E, d, I, k = 32, 2880, 2880, 4
    x = torch.randn(T, d).bfloat16().to(DEV)
    gw, gb = (torch.randn(E, d) / math.sqrt(d)).bfloat16().to(DEV), (torch.randn(E) * 0.1).bfloat16().to(DEV)
    bl1, sc1 = _mxfp4_weight(E, 2 * I, d, 119, 122, DEV)
    bl2, sc2 = _mxfp4_weight(E, d, I, 119, 122, DEV)
    b1, b2 = (torch.randn(E, 2 * I) * 0.1).bfloat16().to(DEV), (torch.randn(E, d) * 0.1).bfloat16().to(DEV)
    out = ops.moe_mlp(x, gw, gb, (bl1, sc1), b1, (bl2, sc2), b2, k=k)
    weights, experts = ops.moe_route(torch.nn.functional.linear(x, gw, gb), k)  # as moe_mlp routes
    expect = torch.zeros(T, d, dtype=torch.float64, device=DEV)
    for e in experts.unique().tolist():
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        w1 = reference.mxfp4_dequantize(bl1[e], sc1[e], torch.float64)
        w2 = reference.mxfp4_dequantize(bl2[e], sc2[e], torch.float64)
        # the kernels' rounding points: the activation and each expert's output y are stored in bf16
        a = reference.swiglu(x[tok].double() @ w1.t() + b1[e].double(), ALPHA, LIMIT).bfloat16().double()
        y = (a @ w2.t() + b2[e].double()).bfloat16().double()
        expect.index_add_(0, tok, y * weights[tok, slot].double().unsqueeze(-1))
    # left: float32 accumulation order, an activation that rounds to the other bf16 neighbour
    assert_close(out, expect, torch.bfloat16, scale=4)


def _experts_mxfp4_by_ops(x, logits, k, bl1, sc1, b1, bl2, sc2, b2):
    weights, experts = C.moe_route(logits, k)
    order, row_token, offsets = C.moe_dispatch(experts, logits.shape[1])
    a = C.moe_grouped_gemm_mxfp4(x, row_token, offsets, bl1, sc1, b1, True, ALPHA, LIMIT)
    y = C.moe_grouped_gemm_mxfp4(a, None, offsets, bl2, sc2, b2, False, ALPHA, LIMIT)
    return C.moe_combine(y, order, weights)


# moe_experts_mxfp4's decode launches (routing, dispatch and schedule in one kernel, then two
# GEMVs and the combine; bfloat16, T k <= 256) must equal the op sequence bit for bit, ties and
# NaN logits included; T k = 260 and float32 run the op sequence itself.
@pytest.mark.parametrize("T,E,k,d,I", [(1, 32, 4, 2880, 2880), (3, 32, 4, 64, 96), (64, 32, 4, 64, 32),
                                       (65, 32, 4, 64, 32), (5, 128, 4, 96, 64), (2, 1024, 1, 32, 32),
                                       (9, 8, 8, 32, 64)])
def test_experts_mxfp4_decode_path_equals_op_sequence(T, E, k, d, I):
    x = torch.randn(T, d, device=DEV).bfloat16()
    logits = torch.randn(T, E, device=DEV).bfloat16()
    if T >= 3:
        logits[1] = 0.5  # all tied: the lowest ids win
        logits[2, E // 2] = float("nan")
    bl1, sc1 = _mxfp4_weight(E, 2 * I, d, 119, 122, DEV)
    bl2, sc2 = _mxfp4_weight(E, d, I, 119, 122, DEV)
    b1 = (torch.randn(E, 2 * I, device=DEV) * 0.1).bfloat16()
    b2 = (torch.randn(E, d, device=DEV) * 0.1).bfloat16()
    got = C.moe_experts_mxfp4(x, logits, k, bl1, sc1, b1, bl2, sc2, b2, ALPHA, LIMIT)
    expect = _experts_mxfp4_by_ops(x, logits, k, bl1, sc1, b1, bl2, sc2, b2)
    assert got.shape == (T, d) and got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), expect.isnan())
    assert torch.equal(got.nan_to_num(), expect.nan_to_num())
    assert got[0].isfinite().all()


# ----------------------------------------------------------------------------- opcheck, errors

def _opcheck_cases():
    x, ri, offsets, w, b = _gemm_case(6, 4, 2, 32, 8, torch.float32)
    xd, rid, offd, wd, bd = _to(DEV, x, ri, offsets, w, b)
    blocks, scales = _mxfp4_weight(4, 8, 32)
    experts = _routing(6, 4, 2, DEV)
    order = _dispatch_oracle(experts.cpu(), 4)[0].to(DEV)
    y = torch.randn(12, 16, device=DEV)
    wts = torch.softmax(torch.randn(6, 2, device=DEV), -1)
    h = torch.randn(5, 12, device=DEV)
    return [
        (C.moe_route.default, (torch.randn(6, 4, device=DEV, requires_grad=True), 2)),
        (C.moe_route_backward.default, (torch.randn(6, 2, device=DEV), wts, experts, 4)),
        (C.moe_dispatch.default, (experts, 4)),
        (C.swiglu.default, (h.clone().requires_grad_(), ALPHA, LIMIT)),
        (C.swiglu_backward.default, (torch.randn(5, 6, device=DEV), h, ALPHA, LIMIT)),
        (C.moe_grouped_gemm.default, (xd.requires_grad_(), rid, offd, wd.requires_grad_(), bd, True, ALPHA, LIMIT)),
        (C.moe_grouped_gemm_backward.default, (torch.randn(12, 8, device=DEV), xd.detach(), rid, offd, wd.detach(),
                                               [True, True, True])),
        (C.moe_grouped_gemm_mxfp4.default, (xd.detach(), rid, offd, blocks.to(DEV), scales.to(DEV), bd, False,
                                            ALPHA, LIMIT)),
        (C.moe_combine.default, (y.requires_grad_(), order, wts.clone().requires_grad_())),
        (C.moe_combine_backward.default, (torch.randn(6, 16, device=DEV), y.detach(), order, wts)),
        (C.mxfp4_dequantize.default, (blocks.to(DEV), scales.to(DEV), torch.bfloat16)),
        (C.mxfp4_quantize.default, (torch.randn(3, 64, device=DEV),)),
        (C.moe_experts_mxfp4.default, (torch.randn(6, 32, device=DEV).bfloat16(),  # the decode launches
                                       torch.randn(6, 4, device=DEV).bfloat16(), 2,
                                       *_to(DEV, *_mxfp4_weight(4, 64, 32)), torch.randn(4, 64, device=DEV).bfloat16(),
                                       *_to(DEV, *_mxfp4_weight(4, 32, 32)), torch.randn(4, 32, device=DEV).bfloat16(),
                                       ALPHA, LIMIT)),
        (C.moe_experts_mxfp4.default, (torch.randn(6, 32, device=DEV), torch.randn(6, 4, device=DEV), 2,
                                       *_to(DEV, *_mxfp4_weight(4, 64, 32)), torch.randn(4, 64, device=DEV),
                                       *_to(DEV, *_mxfp4_weight(4, 32, 32)), torch.randn(4, 32, device=DEV),
                                       ALPHA, LIMIT)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_opcheck_cuda(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_bad_input_errors_on_cuda():
    x, ri, offsets, w, b = _gemm_case(6, 4, 2, 32, 8, torch.float32)
    with pytest.raises(RuntimeError, match="offsets"):
        C.moe_grouped_gemm(x.to(DEV), ri.to(DEV), offsets, w.to(DEV), b.to(DEV), False, ALPHA, LIMIT)  # CPU offsets
    with pytest.raises(RuntimeError, match="k must be in"):
        C.moe_route(torch.randn(3, 4, device=DEV), 5)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        C.mxfp4_quantize(torch.randn(3, 40, device=DEV))
