"""CUDA kernels of rms_norm and rms_norm_backward against the CPU kernels (the
contract), plus opcheck and float64 gradcheck on CUDA. Skipped without a GPU and a CUDA build.

Both backends get the same inputs (made on the CPU in the kernel's dtype, then copied), so the
only differences are float32 summation order, rsqrtf vs 1/sqrt, and the final rounding to the
storage dtype: the conftest tolerance of the output dtype covers them.
"""
import pytest
import torch

import gptoss_ext
from conftest import assert_close, misaligned_cuda, noncontig_last_dim, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

ops = torch.ops.gptoss_ext
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def _scale(d, dtype=torch.float32):
    return (1.0 + 0.5 * torch.randn(d)).to(dtype)


def _check_rms_norm(x, scale, x_cuda=None):
    """Forward and backward, CUDA vs CPU, on the same inputs (x_cuda: x's values on the GPU,
    default x.to(DEV), which keeps x's strides)."""
    rows = x.numel() // x.shape[-1]
    x_cuda = x.to(DEV) if x_cuda is None else x_cuda
    y_cpu, rstd_cpu = ops.rms_norm(x, scale, EPS)
    y_cuda, rstd_cuda = ops.rms_norm(x_cuda, scale.to(DEV), EPS)
    assert y_cuda.device.type == DEV and y_cuda.is_contiguous()
    assert y_cuda.dtype == x.dtype and y_cuda.shape == x.shape
    assert rstd_cuda.dtype == rstd_cpu.dtype and rstd_cuda.shape == x.shape[:-1]
    assert_close(y_cuda, y_cpu)
    assert_close(rstd_cuda, rstd_cpu, dtype=rstd_cpu.dtype)

    g = torch.randn(x.shape, dtype=torch.float32).to(x.dtype)
    dx_cpu, dw_cpu = ops.rms_norm_backward(g, x, scale, rstd_cpu)
    dx_cuda, dw_cuda = ops.rms_norm_backward(g.to(DEV), x_cuda, scale.to(DEV), rstd_cpu.to(DEV))
    assert dx_cuda.dtype == x.dtype and dx_cuda.shape == x.shape and dx_cuda.is_contiguous()
    assert dw_cuda.dtype == scale.dtype and dw_cuda.shape == scale.shape
    assert_close(dx_cuda, dx_cpu)
    # grad_scale sums `rows` products per column in float32 in different orders on the two
    # backends: its rounding error grows like sqrt(rows) (the values themselves grow the same way).
    assert_close(dw_cuda, dw_cpu, dtype=dw_cpu.dtype, scale=max(1.0, rows ** 0.5))
    return dw_cpu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 2880), (7, 769), (8, 2880)], ids=str)
def test_rms_norm_cuda_matches_cpu(shape, dtype):
    dw = _check_rms_norm(torch.randn(shape).to(dtype), _scale(shape[-1]))
    assert dw.abs().max() > 0.1  # the gradient is not trivially zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cuda_noncontiguous(dtype):
    x = noncontig_last_dim((3, 5, 2880), dtype)
    assert not x.to(DEV).is_contiguous()
    _check_rms_norm(x, _scale(2880))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cudamisaligned_cuda(dtype):
    # Contiguous but not 16-byte aligned: the scalar path, with a row length the vector path takes.
    x, x_cuda = misaligned_cuda((9, 2880), dtype)
    _check_rms_norm(x, _scale(2880), x_cuda)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (33, 64), (300, 24), (4, 16384), (3, 40000)], ids=str)
def test_rms_norm_cuda_row_lengths(shape, dtype):
    # Several rows per warp (d = 1, 24, 64), the register kernels' widest shapes (16384: 8 vectors
    # per thread forward, 512 threads per row backward) and rows too long for registers (40000:
    # the streaming kernels).
    _check_rms_norm(torch.randn(shape).to(dtype), _scale(shape[-1]))


@pytest.mark.parametrize("shape", [(64, 2880), (7, 769), (3, 40000)], ids=str)
def test_rms_norm_cuda_float64(shape):
    _check_rms_norm(torch.randn(shape, dtype=torch.float64), _scale(shape[-1], torch.float64))


def test_rms_norm_cuda_bf16_scale():
    # scale in bfloat16: used in float32, grad_scale comes back in bfloat16.
    _check_rms_norm(torch.randn(8, 2880).to(torch.bfloat16), _scale(2880, torch.bfloat16))


def test_rms_norm_cuda_no_rows():
    x = torch.randn(0, 2880, device=DEV)
    w = _scale(2880).to(DEV)
    y, rstd = ops.rms_norm(x, w, EPS)
    assert y.shape == (0, 2880) and rstd.shape == (0,)
    dx, dw = ops.rms_norm_backward(x, x, w, rstd)
    assert dx.shape == (0, 2880) and torch.equal(dw, torch.zeros_like(w))


def test_rms_norm_cuda_deterministic():
    x = torch.randn(4096, 2880, device=DEV, dtype=torch.bfloat16)
    w = _scale(2880).to(DEV)
    g = torch.randn_like(x)
    rstd = ops.rms_norm(x, w, EPS)[1]
    a = ops.rms_norm_backward(g, x, w, rstd)
    b = ops.rms_norm_backward(g, x, w, rstd)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rms_norm_cuda_autograd():
    x = torch.randn(6, 2880, dtype=torch.bfloat16)
    w = _scale(2880)
    grads = []
    for dev in ["cpu", DEV]:
        xd = x.detach().to(dev).requires_grad_()
        wd = w.detach().to(dev).requires_grad_()
        y = gptoss_ext.rms_norm(xd, wd, EPS)
        y.backward(torch.ones_like(y) + y.detach())
        grads.append((xd.grad, wd.grad))
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][1], grads[0][1], dtype=torch.float32, scale=6 ** 0.5)


def test_rms_norm_cuda_errors():
    x = torch.randn(4, 16, device=DEV)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.rms_norm(x, torch.ones(15, device=DEV), EPS)
    with pytest.raises(RuntimeError, match="scale must be on"):
        ops.rms_norm(x, torch.ones(16), EPS)


# ------------------------------------------------------------------- opcheck / gradcheck


def test_opcheck_rms_norm_cuda():
    x = torch.randn(5, 2880, device=DEV, requires_grad=True)
    w = _scale(2880).to(DEV).requires_grad_()
    torch.library.opcheck(ops.rms_norm.default, (x, w, EPS))
    xb = torch.randn(3, 4, 769, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(ops.rms_norm.default, (xb, w[:769].detach().clone().requires_grad_(), EPS))


def test_opcheck_rms_norm_backward_cuda():
    x = torch.randn(5, 2880, device=DEV)
    w = _scale(2880).to(DEV)
    rstd = ops.rms_norm(x, w, EPS)[1]
    torch.library.opcheck(ops.rms_norm_backward.default, (torch.randn_like(x), x, w, rstd))


def test_gradcheck_cuda_float64():
    x = torch.randn(3, 17, dtype=torch.float64, device=DEV, requires_grad=True)
    w = _scale(17, torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gptoss_ext.rms_norm(a, b, EPS), (x, w))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(1, 2880), (4, 2880), (7, 769), (3, 40000)], ids=str)
def test_add_rms_norm_cuda_matches_cpu(shape, dtype):
    # The register kernel (2880, 769), the streaming one (40000, float64). The sum is one rounding
    # of an exact float sum on both sides: equal bit for bit.
    x, res = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype)
    scale = _scale(shape[-1])
    out_c, s_c, rstd_c = ops.add_rms_norm(x, res, scale, EPS)
    out_g, s_g, rstd_g = ops.add_rms_norm(x.to(DEV), res.to(DEV), scale.to(DEV), EPS)
    assert torch.equal(s_g.cpu(), s_c)
    assert_close(out_g, out_c)
    assert_close(rstd_g, rstd_c, dtype=rstd_c.dtype)
    # and the fused kernel equals the unfused pair on the GPU
    y_g, _ = ops.rms_norm(x.to(DEV) + res.to(DEV), scale.to(DEV), EPS)
    assert torch.equal(out_g, y_g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_cuda_misaligned_and_strided(dtype):
    x, x_cuda = misaligned_cuda((9, 2880), dtype)  # residual misaligned: the scalar path
    res = noncontig_last_dim((9, 2880), dtype)
    scale = _scale(2880)
    out_c, s_c, _ = ops.add_rms_norm(x, res, scale, EPS)
    out_g, s_g, _ = ops.add_rms_norm(res.to(DEV), x_cuda, scale.to(DEV), EPS)
    assert torch.equal(s_g.cpu(), s_c)
    assert_close(out_g, out_c)


def test_add_rms_norm_cuda_autograd_and_opcheck():
    x, res, g = torch.randn(5, 2880), torch.randn(5, 2880), torch.randn(5, 2880)
    scale = _scale(2880)
    grads = []
    for dev in ("cpu", DEV):  # fresh leaves on each device (x.to("cpu") would be x itself)
        leaves = [t.detach().to(dev).clone().requires_grad_() for t in (x, res, scale)]
        out, s = gptoss_ext.add_rms_norm(*leaves, EPS)
        (out * g.to(dev) + s.square()).sum().backward()
        grads.append([t.grad.cpu() for t in leaves])
    for cpu, cuda in zip(*grads):
        assert_close(cuda, cpu, dtype=torch.float32, scale=max(1.0, 5 ** 0.5))
    assert torch.equal(grads[1][0], grads[1][1])  # d/dx = d/dresidual
    args = [t.detach().to(DEV).requires_grad_() for t in (x, res, scale)]
    torch.library.opcheck(torch.ops.gptoss_ext.add_rms_norm.default, (*args, EPS))
