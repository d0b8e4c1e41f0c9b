"""Shared test setup: devices, seeds, and the one tolerance table every test uses."""
import os
import tempfile

import pytest
import torch

import gptoss_ext

# The tokenizer's vocabulary file (gptoss.tokenizer.vocab_dir) goes to a test folder unless the
# caller chose one.
os.environ.setdefault("GPTOSS_CACHE", os.path.join(tempfile.gettempdir(), "gptoss-test-cache"))

# Absolute and relative tolerance per dtype, for a kernel compared with the float64 oracle whose
# inputs were rounded to the kernel's dtype first. Low-precision rows allow one or two roundings
# of the output.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

HAS_CUDA = torch.cuda.is_available() and gptoss_ext.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of gptoss_ext")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, scale: float = 1.0):
    """assert_close with the table's tolerance for `dtype` (default: actual's dtype), times scale."""
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(),
                               atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def assert_error_within(actual: torch.Tensor, oracle64: torch.Tensor, same_dtype_ref: torch.Tensor,
                        factor: float = 2.0, floor: float = 1e-6):
    """Kernel error vs the float64 oracle is at most `factor` x the error of the reference run in
    the kernel's dtype (plus a tiny floor for exact cases). Max-abs errors."""
    err = (actual.double().cpu() - oracle64.double().cpu()).abs().max().item()
    ref_err = (same_dtype_ref.double().cpu() - oracle64.double().cpu()).abs().max().item()
    assert err <= factor * ref_err + floor, f"kernel error {err:.3e} > {factor} x reference error {ref_err:.3e}"


def noncontig_last_dim(shape, dtype):
    """Random tensor of `shape` whose last dim is strided (a transposed view)."""
    t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float32).to(dtype).transpose(-1, -2)
    assert not t.is_contiguous()
    return t


def misaligned_cuda(shape, dtype):
    """(CPU copy, CUDA tensor): random, contiguous, the CUDA one's data pointer one element past
    a 16-byte boundary (made on the device: a copy to it would be aligned)."""
    n = 1
    for s in shape:
        n *= s
    t = torch.randn(n + 1, dtype=torch.float32).to(dtype).to("cuda")[1:].view(shape)
    assert t.is_contiguous() and t.data_ptr() % 16 != 0
    return t.cpu(), t


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fixed seed per test (derived from its name), so failures reproduce and tests are
    # independent of run order.
    seed = sum(ord(c) for c in request.node.nodeid) % (2**31)
    torch.manual_seed(seed)
    yield


def pytest_report_header(config):
    return (f"gptoss_ext build: {gptoss_ext.build_info}; torch {torch.__version__}; "
            f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
            f"threads: {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
