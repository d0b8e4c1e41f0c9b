"""CUDA linear (cuBLAS through at::linear) against the CPU kernel and the float64 oracle, opcheck
and bad input on CUDA. Skipped without a GPU and a CUDA build."""
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
