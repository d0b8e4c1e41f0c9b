"""CUDA linear (the GEMV kernel up to 4 rows, cuBLAS above) against the CPU kernel and the float64
oracle, opcheck and bad input on CUDA. Skipped without a GPU and a CUDA build."""
import math

import pytest
import torch

from conftest import assert_close, requires_cuda
from gptoss_ext import ops, reference

pytestmark = [requires_cuda, pytest.mark.cuda]

DEV = "cuda"


@pytest.mark.parametrize("M,N,K", [(1, 130, 2880), (8, 33, 4096), (40, 7, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_cuda_matches_cpu_and_oracle(M, N, K, dtype):
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(dtype)
    b = torch.randn(N).to(dtype)
    y = ops.linear(x.to(DEV), w.to(DEV), b.to(DEV))
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (M, N)
    assert_close(y, reference.linear(x.double(), w.double(), b.double()), dtype)
    assert_close(y, ops.linear(x, w, b), dtype, scale=2)


def test_cuda_opcheck_and_errors():
    x = torch.randn(2, 64, device=DEV).bfloat16()
    w = torch.randn(16, 64, device=DEV).bfloat16()
    b = torch.randn(16, device=DEV).bfloat16()
    torch.library.opcheck(torch.ops.gptoss_ext.linear, (x, w, b))
    with pytest.raises(RuntimeError, match="linear: weight must be on x's device"):
        ops.linear(x, w.cpu(), b)
    with pytest.raises(RuntimeError, match="linear: bias must be \\[N\\] = \\[16\\]"):
        ops.linear(x, w, b[:3])


# Decode shapes (<= 4 rows, bfloat16/float16, K % 8 == 0: the GEMV kernel) and their neighbours
# that go to cuBLAS: odd N (a warp's second row past N), K % 8 != 0, 5 rows, leading dims, no bias,
# x not 16-byte aligned; gpt-oss-20b's qkv / out / router shapes.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,N,K", [((1,), 5120, 2880), ((1,), 2880, 4096), ((1,), 32, 2880), ((2,), 33, 264),
                                       ((3,), 1, 8), ((4,), 17, 1032), ((1, 3), 9, 72), ((5,), 40, 64),
                                       ((2,), 12, 36)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_decode_shapes_match_oracle(dtype, shape, N, K, with_bias):
    x = torch.randn(*shape, K).to(dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(dtype)
    b = torch.randn(N).to(dtype) if with_bias else None
    y = ops.linear(x.to(DEV), w.to(DEV), b.to(DEV) if with_bias else None)
    assert y.shape == (*shape, N) and y.dtype == dtype
    expect = reference.linear(x.double(), w.double(), b.double() if with_bias else None)
    assert_close(y, expect, dtype)


def test_cuda_gemv_unaligned_x_and_nan():
    K, N = 64, 24
    buf = torch.randn(2 * K + 1, device=DEV).bfloat16()
    x = buf[1:K + 1].view(1, K)  # 2-byte offset: not 16-byte aligned
    w = torch.randn(N, K, device=DEV).bfloat16()
    assert_close(ops.linear(x, w, None), reference.linear(x.double(), w.double(), None), torch.bfloat16)
    x = torch.randn(2, K, device=DEV).bfloat16()
    x[1, 5] = float("nan")
    y = ops.linear(x, w, None)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def test_cuda_cublas_path_restores_reduction_setting():
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    x = torch.randn(8, 4096, device=DEV).bfloat16()
    w = torch.randn(33, 4096, device=DEV).bfloat16()
    ops.linear(x, w, None)
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction == flag
