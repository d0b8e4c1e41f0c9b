"""linear (the dense projections): the CPU kernel against the oracle (gptoss_ext.reference.linear
in float64) on decode shapes (the weight-streaming GEMV: bfloat16, at most 4 rows) and the rest
(at::linear), gradients, opcheck, compile, bad input (CUDA vs CPU: test_linear_cuda.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from gptoss_ext import ops, reference

DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.float64]


def _case(M, N, K, dtype, bias=True, lead=()):
    x = torch.randn(*lead, M, K).to(dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    return x, w, b


def _oracle(x, w, b):
    return reference.linear(x.double(), w.double(), None if b is None else b.double())


# gpt-oss shapes (K = 2880 hidden, 4096 = 64 heads x 64) and awkward ones: K not a multiple of 32
# (the masked tail), K < 32, N not a multiple of the 4 weight rows a step takes, N = 1.
@pytest.mark.parametrize("N,K", [(130, 2880), (33, 4096), (7, 33), (5, 7), (1, 64), (64, 31)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(M, N, K, dtype):
    x, w, b = _case(M, N, K, dtype)
    y = ops.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close(y, _oracle(x, w, b), dtype)
    y0 = ops.linear(x, w, None)
    assert_close(y0, _oracle(x, w, None), dtype)


@pytest.mark.parametrize("lead,M", [((2,), 1), ((2, 2), 2), ((3,), 4), ((1,), 9)])
def test_batched_leading_dims(lead, M):
    x, w, b = _case(M, 48, 96, torch.bfloat16, lead=lead)
    y = ops.linear(x, w, b)
    assert y.shape == (*lead, M, 48)
    assert_close(y, _oracle(x, w, b), torch.bfloat16)


def test_strided_inputs():
    # x a transposed view (copied to rows), weight a transposed view (not row-major: at::linear),
    # bias a strided view
    xt = torch.randn(96, 3).bfloat16().t()
    w = (torch.randn(96, 40) / math.sqrt(96)).bfloat16().t()
    b = torch.randn(80).bfloat16()[::2]
    assert not (xt.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    assert_close(ops.linear(xt, w, b), _oracle(xt, w, b), torch.bfloat16)
    assert_close(ops.linear(xt, w.contiguous(), b), _oracle(xt, w, b), torch.bfloat16)


def test_empty_and_nonfinite():
    w = torch.randn(6, 64).bfloat16()
    b = torch.randn(6).bfloat16()
    assert ops.linear(torch.randn(0, 64).bfloat16(), w, b).shape == (0, 6)
    assert ops.linear(torch.randn(2, 64).bfloat16(), w[:0], b[:0]).shape == (2, 0)
    x = torch.randn(3, 64).bfloat16()
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = ops.linear(x, w, b).float()
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    assert not torch.isfinite(y[2]).any()  # +-inf, or nan where the weight's sign cancels it


def test_agrees_with_torch_in_bfloat16():
    # the GEMV (float32 sums of exact products) against torch's own bfloat16 F.linear: both round
    # one float32 sum, so they differ by at most an ulp or two of the output
    x, w, b = _case(1, 512, 2880, torch.bfloat16)
    assert_close(ops.linear(x, w, b), F.linear(x, w, b), torch.bfloat16)


@pytest.mark.parametrize("M", [1, 6, 20])
def test_gradients(M):
    x, w, b = _case(M, 9, 40, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ops.linear(*a), args)
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (x, w, b))
    g = torch.randn(M, 9).bfloat16()
    ops.linear(xb, wb, bb).backward(g)
    xr, wr, br = (t.detach().bfloat16().requires_grad_() for t in (x, w, b))
    F.linear(xr, wr, br).backward(g)
    for got, ref in ((xb.grad, xr.grad), (wb.grad, wr.grad), (bb.grad, br.grad)):
        assert_close(got, ref, torch.bfloat16)
    x2 = x.detach().requires_grad_()
    ops.linear(x2, w.detach(), None).sum().backward()  # no bias: no bias gradient slot used
    assert_close(x2.grad, w.detach().sum(0).expand(M, 40), torch.float64)


@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (8, torch.bfloat16), (12, torch.float32)])
def test_opcheck(M, dtype):
    x, w, b = _case(M, 20, 64, dtype)
    torch.library.opcheck(torch.ops.gptoss_ext.linear, (x, w, b))
    torch.library.opcheck(torch.ops.gptoss_ext.linear, (x, w, None))


def test_compiles():
    x, w, b = _case(1, 20, 64, torch.bfloat16)
    f = torch.compile(lambda a, c, d: ops.linear(a, c, d) * 2, backend="aot_eager", fullgraph=True)
    assert_close(f(x, w, b), 2 * _oracle(x, w, b), torch.bfloat16)


def test_bad_input():
    x, w, b = _case(2, 5, 16, torch.float32)
    with pytest.raises(RuntimeError, match="linear: weight must be \\[N, K\\] with K = x's last dim"):
        ops.linear(x, w[:, :15], b)
    with pytest.raises(RuntimeError, match="linear: weight must be \\[N, K\\] \\(2-D\\)"):
        ops.linear(x, w[0], b)
    with pytest.raises(RuntimeError, match="linear: weight must have the dtype of x"):
        ops.linear(x, w.bfloat16(), b)
    with pytest.raises(RuntimeError, match="linear: bias must be \\[N\\] = \\[5\\]"):
        ops.linear(x, w, b[:4])
    with pytest.raises(RuntimeError, match="linear: bias must have the dtype of x"):
        ops.linear(x, w, b.double())
    with pytest.raises(RuntimeError, match="linear: x must be float32, bfloat16, float16 or float64"):
        ops.linear(x.int(), w, b)
    with pytest.raises(RuntimeError, match="linear: x must be \\[..., K\\]"):
        ops.linear(x[0, 0], w[:, :1], b)


def test_reference_linear():
    x, w, b = _case(3, 10, 50, torch.bfloat16)
    expect = F.linear(x.float(), w.float(), b.float()).bfloat16()  # float32 math, one rounding
    assert torch.equal(reference.linear(x, w, b), expect)
    with pytest.raises(ValueError, match="linear: weight must be \\[N, K\\]"):
        reference.linear(x, w[:, :49], b)
