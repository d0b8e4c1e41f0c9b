"""RoPE: YaRN tables against the spec's numbers, apply_rope CPU kernel vs the oracle, gradients,
opcheck, compile, bad input (CUDA vs CPU: test_rope_cuda.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOL, assert_close
from gptoss_ext import RotaryEmbedding, ops, reference, yarn_inv_freq

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# spec §2.3: fp32 inv_freq of gpt-oss (theta 150000, factor 32, L0 4096, alpha 1, beta 32).
SPEC_INV_FREQ = {0: 1.0, 1: 6.890443e-1, 2: 4.747820e-1, 3: 3.271458e-1, 4: 2.254180e-1, 5: 1.553230e-1,
                 6: 1.070244e-1, 7: 7.374457e-2, 8: 5.081328e-2, 9: 3.170570e-2, 10: 1.933500e-2,
                 11: 1.159205e-2, 12: 6.794959e-3, 13: 3.860359e-3, 14: 2.093793e-3, 15: 1.052602e-3,
                 16: 4.564839e-4, 17: 1.293187e-4, 18: 3.830881e-5, 31: 3.023511e-7}


def test_yarn_table_matches_spec():
    inv_freq, concentration = yarn_inv_freq()
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (32,)
    for i, value in SPEC_INV_FREQ.items():
        assert math.isclose(inv_freq[i].item(), value, rel_tol=2e-6), (i, inv_freq[i].item(), value)
    assert math.isclose(concentration, 1.3465735902799727, rel_tol=1e-12)
    assert math.isclose(concentration ** 2, 1.8132604, rel_tol=1e-7)


def test_no_yarn_is_plain_rope():
    inv_freq, concentration = yarn_inv_freq(64, 10000.0, 1.0, 512)
    assert concentration == 1.0
    torch.testing.assert_close(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 64, 2) / 64.0))


def test_cos_sin_any_positions():
    rope = RotaryEmbedding()
    pos = torch.tensor([[0, 1, 2, 3], [1000, 1001, 5000, 131071]])  # ragged decode offsets, table growth
    cos, sin = rope.cos_sin(pos)
    assert cos.shape == (2, 4, 32) and cos.dtype == torch.float32
    ref_cos, ref_sin = reference.rope_cos_sin(pos, dtype=torch.float32)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    # Small positions are also close to the exact (float64) angle.
    c64, s64 = reference.rope_cos_sin(pos[0])
    torch.testing.assert_close(cos[0].double(), c64, rtol=0, atol=1e-6)
    assert torch.equal(rope.cos_sin(torch.arange(4))[0], cos[0])
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope.cos_sin(torch.zeros(3))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.cos_sin(torch.tensor([-1]))


def tables(shape_bt, head_dim, offset=0):
    # gpt-oss YaRN where it is defined (head_dim >= 16), plain RoPE for tiny head dims.
    rope = RotaryEmbedding(head_dim=head_dim) if head_dim >= 16 else RotaryEmbedding(head_dim, 10000.0, 1.0)
    pos = torch.arange(shape_bt[-1]) + offset
    if len(shape_bt) == 2:  # per-sequence positions
        pos = pos + torch.arange(shape_bt[0])[:, None] * 37
    return rope.cos_sin(pos)


@pytest.mark.parametrize("shape, per_batch, offset", [
    ((2, 300, 64, 64), False, 0),     # real heads and head_dim, T > window
    ((1, 7, 8, 64), True, 4093),      # decode-like offsets around the original context
    ((300, 8, 64), False, 5),         # [T, H, D]
    ((3, 5, 2, 128), True, 0),
    ((2, 3, 1, 2), False, 1),         # D = 2: one pair
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_oracle(shape, per_batch, offset, dtype):
    x = torch.randn(shape).to(dtype)
    bt = (shape[0], shape[1]) if per_batch else (shape[-3],)
    cos, sin = tables(bt, shape[-1], offset)
    y = ops.apply_rope(x, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, reference.apply_rope(x, cos, sin), dtype)
    assert_close(y, reference.apply_rope(x.double(), cos.double(), sin.double()), dtype, scale=2)


def test_non_contiguous_input():
    base = torch.randn(2, 64, 300, 64)
    x = base.transpose(1, 2)  # [B, T, H, D] view of a [B, H, T, D] tensor
    cos, sin = tables((300,), 64)
    assert_close(ops.apply_rope(x, cos, sin), reference.apply_rope(x, cos, sin))
    assert_close(ops.apply_rope(x, cos[:, :], sin.t().contiguous().t()), reference.apply_rope(x, cos, sin))


def test_rotation_preserves_norm_times_concentration():
    x = torch.randn(1, 50, 4, 64, dtype=torch.float64)
    cos, sin = tables((50,), 64, offset=10)
    y = ops.apply_rope(x, cos.double(), sin.double())
    _, concentration = yarn_inv_freq()
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1) * concentration)


def test_gradcheck_float64():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = tables((2, 5), 16, offset=3)
    torch.autograd.gradcheck(lambda a: ops.apply_rope(a, cos.double(), sin.double()), (x,))
    x3 = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    cos3, sin3 = tables((5,), 16)
    torch.autograd.gradcheck(lambda a: ops.apply_rope(a, cos3, sin3), (x3,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd_through_oracle(dtype):
    x = torch.randn(2, 129, 8, 64).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    cos, sin = tables((129,), 64)
    x1 = x.clone().requires_grad_()
    ops.apply_rope(x1, cos, sin).backward(g)
    x2 = x.double().requires_grad_()
    reference.apply_rope(x2, cos.double(), sin.double()).backward(g.double())
    assert_close(x1.grad, x2.grad, dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    x = torch.randn(2, 9, 3, 64).to(dtype).requires_grad_()
    cos, sin = tables((2, 9), 64)
    torch.library.opcheck(torch.ops.gptoss_ext.apply_rope.default, (x, cos, sin))


def test_compile_fullgraph():
    x = torch.randn(1, 130, 8, 64, dtype=torch.bfloat16)
    cos, sin = tables((130,), 64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a):
        return ops.apply_rope(a, cos, sin) * 2

    assert_close(f(x), reference.apply_rope(x, cos, sin) * 2, torch.bfloat16)


@pytest.mark.parametrize("make_args, pattern", [
    (lambda: (torch.randn(4, 8, 2, 64), torch.ones(4, 31), torch.ones(4, 31)), r"cos must be \[T, D/2\] = \[8, 32\]"),
    (lambda: (torch.randn(4, 8, 2, 63), torch.ones(8, 31), torch.ones(8, 31)), r"head dim D must be even"),
    (lambda: (torch.randn(8, 64), torch.ones(8, 32), torch.ones(8, 32)), r"x must be \[B, T, H, D\] or \[T, H, D\]"),
    (lambda: (torch.randn(2, 8, 2, 64), torch.ones(8, 32), torch.ones(7, 32)), r"sin must be \[T, D/2\]"),
    (lambda: (torch.randn(2, 8, 2, 64), torch.ones(8, 32, dtype=torch.bfloat16), torch.ones(8, 32)),
     r"cos must be Float/Double"),
    (lambda: (torch.randn(2, 8, 2, 64), torch.ones(3, 8, 32), torch.ones(3, 8, 32)), r"or \[B, T, D/2\]"),
    (lambda: (torch.randint(0, 2, (2, 8, 2, 64)), torch.ones(8, 32), torch.ones(8, 32)), r"x must be float32"),
])
def test_bad_input(make_args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.apply_rope(*make_args())


@settings(max_examples=150, deadline=None)
@given(b=st.integers(0, 3), t=st.integers(1, 40), h=st.integers(1, 9), half=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES + [torch.float64]), log_mag=st.floats(-6, 3.5), per_batch=st.booleans(),
       transposed=st.booleans(), offset=st.integers(0, 200000), seed=st.integers(0, 2**31 - 1))
def test_property_against_oracle(b, t, h, half, dtype, log_mag, per_batch, transposed, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (max(b, 1), t, h, 2 * half) if b else (t, h, 2 * half)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** log_mag).to(dtype)
    if transposed:
        x = x.transpose(-2, -3).contiguous().transpose(-2, -3)
    rope = RotaryEmbedding(head_dim=2 * half, rope_theta=10000.0, rope_scaling_factor=1.0)
    pos = torch.arange(t) + offset
    if per_batch and b:
        pos = pos + torch.randint(0, 1000, (shape[0], 1), generator=gen)
    cos, sin = rope.cos_sin(pos)
    # absolute tolerance on the inputs' scale: x cos - x' sin may cancel far below |x|, and the two
    # sides round their products differently (a fused multiply-add or not)
    tol = TOL[dtype]
    mag = max(1.0, float(x.double().abs().max())) if x.numel() else 1.0
    torch.testing.assert_close(ops.apply_rope(x, cos, sin).double(), reference.apply_rope(x, cos, sin).double(),
                               atol=tol["atol"] * mag, rtol=tol["rtol"])
