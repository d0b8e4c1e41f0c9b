"""rms_norm: CPU kernel vs the oracle, gradients, opcheck, compile, bad input (CUDA vs CPU:
test_rms_norm_cuda.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from gptoss_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# gpt-oss hidden size, a decode batch, awkward sizes (odd d, not a multiple of any vector width),
# a single element.
SHAPES = [(64, 2880), (8, 2880), (3, 5, 2880), (7, 769), (2, 33), (1, 1)]


def make(shape, dtype, device="cpu", magnitude=1.0):
    x = (torch.randn(shape, device=device) * magnitude).to(dtype)
    scale = torch.rand(shape[-1], device=device) * 2 + 0.1  # fp32, as gpt-oss stores it
    return x, scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_oracle(shape, dtype):
    x, scale = make(shape, dtype)
    y = ops.rms_norm(x, scale, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    # Same semantics (fp32 math, one rounding at the end) ...
    assert_close(y, reference.rms_norm(x, scale, 1e-5), dtype)
    # ... and close to the exact value.
    assert_close(y, reference.rms_norm(x.double(), scale.double(), 1e-5), dtype, scale=2)


def test_bf16_scale_and_rstd():
    x, scale = make((16, 2880), torch.bfloat16)
    y, rstd = torch.ops.gptoss_ext.rms_norm(x, scale.bfloat16(), 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (16,)
    expected = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(rstd, expected, rtol=1e-6, atol=0)
    assert_close(y, reference.rms_norm(x, scale.bfloat16(), 1e-5))


def test_non_contiguous_input():
    base, _ = make((40, 2 * 769), torch.float32)
    scale = torch.rand(769) + 0.5
    x = base[:, ::2]  # stride 2 in the normalised dim
    assert not x.is_contiguous()
    assert_close(ops.rms_norm(x, scale), reference.rms_norm(x, scale))
    xt = torch.randn(769, 12).t()  # transposed
    assert_close(ops.rms_norm(xt, scale), reference.rms_norm(xt, scale))


def test_eps_matters():
    x = torch.randn(4, 64) * 1e-3
    scale = torch.ones(64)
    assert_close(ops.rms_norm(x, scale, eps=1e-2), reference.rms_norm(x, scale, 1e-2))
    assert not torch.allclose(ops.rms_norm(x, scale, eps=1e-2), ops.rms_norm(x, scale, eps=1e-8))


def test_empty_rows():
    x, scale = make((0, 2880), torch.float32)
    assert ops.rms_norm(x, scale).shape == (0, 2880)


def test_gradcheck_float64():
    x = torch.randn(5, 3, 37, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(37, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd_through_oracle(dtype):
    x, scale = make((96, 2880), dtype)
    grad = torch.randn(x.shape).to(dtype)
    x1, s1 = x.clone().requires_grad_(), scale.clone().requires_grad_()
    ops.rms_norm(x1, s1).backward(grad)
    x2, s2 = x.double().requires_grad_(), scale.double().requires_grad_()
    reference.rms_norm(x2, s2).backward(grad.double())
    assert x1.grad.dtype == dtype and s1.grad.dtype == torch.float32
    assert_close(x1.grad, x2.grad, dtype, scale=2)
    # grad_scale sums 96 rows: scale the tolerance by the row count's rounding growth.
    assert_close(s1.grad, s2.grad, torch.float32, scale=50 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    x, scale = make((6, 130), dtype)
    x.requires_grad_()
    scale = scale.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.gptoss_ext.rms_norm.default, (x, scale, 1e-5))
    y, rstd = torch.ops.gptoss_ext.rms_norm(x.detach(), scale.detach(), 1e-5)
    torch.library.opcheck(torch.ops.gptoss_ext.rms_norm_backward.default,
                          (torch.randn_like(y), x.detach(), scale.detach(), rstd))


def test_compile_fullgraph():
    x, scale = make((9, 2880), torch.bfloat16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, s):
        return ops.rms_norm(a * 2, s) + 1

    assert_close(f(x, scale), reference.rms_norm(x * 2, scale) + 1, torch.bfloat16, scale=2)


@pytest.mark.parametrize("make_args, pattern", [
    (lambda: (torch.randn(4, 8), torch.ones(7), 1e-5), r"scale must have shape \[8\]"),
    (lambda: (torch.randn(4, 8), torch.ones(8, 1), 1e-5), r"scale must have shape \[8\]"),
    (lambda: (torch.randn(4, 8), torch.ones(8), float("nan")), r"eps must be finite"),
    (lambda: (torch.randn(4, 8), torch.ones(8), -1.0), r"eps must be >= 0"),
    (lambda: (torch.randint(0, 3, (4, 8)), torch.ones(8), 1e-5), r"x must be float32, bfloat16"),
    (lambda: (torch.randn(4, 8), torch.ones(8, dtype=torch.int32), 1e-5), r"scale must be float32"),
    (lambda: (torch.tensor(1.0), torch.ones(1), 1e-5), r"x must be \[\.\.\., d\]"),
    (lambda: (torch.randn(4, 0), torch.ones(0), 1e-5), r"last dim \(d\) must be > 0"),
])
def test_bad_input(make_args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.rms_norm(*make_args())


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 24), d=st.integers(1, 300), dtype=st.sampled_from(DTYPES + [torch.float64]),
       log_mag=st.floats(-8, 8), stride=st.sampled_from([1, 2, 3]), eps=st.sampled_from([1e-5, 1e-6, 0.1]),
       seed=st.integers(0, 2**31 - 1))
def test_property_against_oracle(rows, d, dtype, log_mag, stride, eps, seed):
    if dtype == torch.float16:
        log_mag = min(log_mag, 3.5)  # stay inside float16's range (max 65504)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d * stride, dtype=torch.float64, generator=gen) * 10.0 ** log_mag).to(dtype)[:, ::stride]
    scale = torch.randn(d, generator=gen) * 3
    assert_close(ops.rms_norm(x, scale, eps), reference.rms_norm(x, scale, eps), dtype)


# ------------------------------------------------------------------------------ add_rms_norm

@pytest.mark.parametrize("shape", SHAPES + [(0, 2880)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_add_rms_norm_equals_the_op_sequence(shape, dtype):
    # The contract is exactly rms_norm(x + residual): the sum rounded to x's dtype as torch's add
    # rounds it, then the same normalisation. Bit for bit.
    x, scale = make(shape, dtype, magnitude=4.0)
    res = torch.randn(shape).to(dtype)
    out, s = ops.add_rms_norm(x, res, scale, 1e-5)
    assert out.dtype == s.dtype == dtype and out.shape == s.shape == x.shape
    assert torch.equal(s, x + res)
    assert torch.equal(out, ops.rms_norm(x + res, scale, 1e-5))
    if x.numel():
        assert_close(out, reference.rms_norm(x.double() + res.double(), scale.double(), 1e-5), dtype, scale=2)


def test_add_rms_norm_rstd_and_strided_inputs():
    base = torch.randn(6, 2 * 300).bfloat16()
    x, res = base[:, ::2], torch.randn(300, 6).bfloat16().t()
    scale = torch.rand(300) + 0.5
    out, s, rstd = torch.ops.gptoss_ext.add_rms_norm(x, res, scale, 1e-6)
    assert out.is_contiguous() and s.is_contiguous()
    assert torch.equal(s, x + res)
    y, rstd_seq = torch.ops.gptoss_ext.rms_norm(x + res, scale, 1e-6)
    assert torch.equal(out, y) and torch.equal(rstd, rstd_seq)


def test_add_rms_norm_gradcheck_float64():
    x = torch.randn(4, 3, 37, dtype=torch.float64, requires_grad=True)
    res = torch.randn(4, 3, 37, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(37, dtype=torch.float64) + 0.5).requires_grad_()
    # Both outputs used (the model feeds the sum on as the residual stream), and each alone.
    torch.autograd.gradcheck(lambda a, r, w: ops.add_rms_norm(a, r, w, 1e-5), (x, res, scale))
    torch.autograd.gradcheck(lambda a, r, w: ops.add_rms_norm(a, r, w, 1e-5)[0], (x, res, scale))
    torch.autograd.gradcheck(lambda a, r, w: ops.add_rms_norm(a, r, w, 1e-5)[1].sin(), (x, res, scale))


def test_add_rms_norm_opcheck_and_compile():
    x, scale = make((5, 130), torch.float32)
    res = torch.randn(5, 130)
    torch.library.opcheck(torch.ops.gptoss_ext.add_rms_norm.default,
                          (x.requires_grad_(), res.requires_grad_(), scale.requires_grad_(), 1e-5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, r, w):
        y, s = ops.add_rms_norm(a * 2, r, w)
        return y + s

    xb, rb = x.detach().bfloat16(), res.detach().bfloat16()
    expected = ops.rms_norm(xb * 2 + rb, scale.detach()) + (xb * 2 + rb)
    assert torch.equal(f(xb, rb, scale.detach()), expected)


@pytest.mark.parametrize("make_args, pattern", [
    (lambda: (torch.randn(4, 8), torch.randn(4, 7), torch.ones(8)), r"add_rms_norm: residual must have x's shape"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8).bfloat16(), torch.ones(8)), r"residual must have the dtype of x"),
    (lambda: (torch.randn(4, 8), torch.randint(0, 3, (4, 8)), torch.ones(8)), r"residual must be float32"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.ones(7)), r"add_rms_norm: scale must have shape \[8\]"),
])
def test_add_rms_norm_bad_input(make_args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.add_rms_norm(*make_args())
