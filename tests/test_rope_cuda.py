"""CUDA kernel of apply_rope against the CPU kernel (the contract), plus opcheck and float64
gradcheck on CUDA. Skipped without a GPU and a CUDA build.

Both backends get the same inputs (made on the CPU in the kernel's dtype, then copied) and the
same float32 tables; the rotation's two products may fuse differently (FMA), and the output is
rounded to the storage dtype: the conftest tolerance of the output dtype covers that.
"""
import pytest
import torch

import gptoss_ext
from conftest import assert_close, misaligned_cuda, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

ops = torch.ops.gptoss_ext
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(B, T, D, per_batch):
    """gpt-oss YaRN cos/sin (concentration included; plain RoPE for D < 8, where YaRN's ramp is
    undefined), float32: [B, T, D/2] with per-sequence position offsets, or [T, D/2]."""
    rope = gptoss_ext.RotaryEmbedding(head_dim=D, rope_scaling_factor=32.0 if D >= 8 else 1.0)
    if per_batch:
        pos = torch.arange(T)[None, :] + torch.randint(0, 5000, (B, 1))
    else:
        pos = torch.arange(T) + 11
    return rope.cos_sin(pos)


def _check_rope(x, cos, sin, x_cuda=None):
    x_cuda = x.to(DEV) if x_cuda is None else x_cuda
    y_cpu = ops.apply_rope(x, cos, sin)
    y_cuda = ops.apply_rope(x_cuda, cos.to(DEV), sin.to(DEV))
    assert y_cuda.dtype == x.dtype and y_cuda.shape == x.shape and y_cuda.is_contiguous()
    assert_close(y_cuda, y_cpu)
    # The backward is the inverse rotation (apply_rope with -sin).
    assert_close(ops.apply_rope(x_cuda, cos.to(DEV), -sin.to(DEV)), ops.apply_rope(x, cos, -sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 300, 64, 64), (1, 7, 8, 64)], ids=str)
def test_rope_cuda_matches_cpu_per_batch(shape, dtype):
    B, T, H, D = shape
    cos, sin = _tables(B, T, D, per_batch=True)
    assert cos.shape == (B, T, D // 2)
    _check_rope(torch.randn(shape).to(dtype), cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 300, 8, 64), (7, 64, 64), (3, 5, 2, 36), (4, 3, 2)], ids=str)
def test_rope_cuda_matches_cpu_shared_table(shape, dtype):
    # Shared [T, D/2] tables; 3-D x; D/2 = 18 and 1 (no 16-byte vectors: scalar path).
    T, D = shape[-3], shape[-1]
    cos, sin = _tables(1, T, D, per_batch=False)
    _check_rope(torch.randn(shape).to(dtype), cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_cuda_noncontiguous_andmisaligned_cuda(dtype):
    B, T, H, D = 2, 129, 8, 64
    cos, sin = _tables(B, T, D, per_batch=True)
    x = torch.randn(B, H, T, D).to(dtype).transpose(1, 2)  # [B, T, H, D], not contiguous
    assert not x.to(DEV).is_contiguous()
    _check_rope(x, cos, sin)
    x, x_cuda = misaligned_cuda((B, T, H, D), dtype)
    _check_rope(x, cos, sin, x_cuda)


def test_rope_cuda_float64():
    B, T, H, D = 2, 33, 4, 64
    cos, sin = _tables(B, T, D, per_batch=True)
    _check_rope(torch.randn(B, T, H, D, dtype=torch.float64), cos.double(), sin.double())
    _check_rope(torch.randn(B, T, H, D, dtype=torch.float64), cos, sin)  # float32 tables


def test_rope_cuda_errors():
    x = torch.randn(2, 7, 4, 64, device=DEV)
    cos = torch.randn(7, 31, device=DEV)
    with pytest.raises(RuntimeError, match="cos must be"):
        ops.apply_rope(x, cos, cos)


# ------------------------------------------------------------------- opcheck / gradcheck


def test_opcheck_apply_rope_cuda():
    cos, sin = _tables(2, 9, 64, per_batch=True)
    x = torch.randn(2, 9, 8, 64, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.apply_rope.default, (x, cos.to(DEV), sin.to(DEV)))
    c2, s2 = _tables(1, 9, 64, per_batch=False)
    torch.library.opcheck(ops.apply_rope.default, (x.detach()[0].clone().requires_grad_(), c2.to(DEV), s2.to(DEV)))


def test_gradcheck_cuda_float64():
    cos, sin = _tables(2, 5, 8, per_batch=True)
    xr = torch.randn(2, 5, 3, 8, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gptoss_ext.apply_rope(a, cos.to(DEV), sin.to(DEV)), (xr,))
