"""Every CUDA op once on small, awkward shapes, compared with the CPU kernel. Small enough to run
under compute-sanitizer (memcheck, racecheck) in seconds; exits non-zero on a mismatch."""
import sys

import torch

import gptoss_ext
from gptoss_ext import RotaryEmbedding, ops


def check(name, cuda_out, cpu_out, atol, rtol):
    ok = torch.allclose(cuda_out.cpu().double(), cpu_out.double(), atol=atol, rtol=rtol)
    print(f"{name}: {'ok' if ok else 'MISMATCH'}")
    return ok


def main():
    assert torch.cuda.is_available() and gptoss_ext.has_cuda_kernels(), "needs a GPU and a CUDA build"
    torch.manual_seed(0)
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for shape in ((3, 2880), (5, 769), (2, 3, 33)):
            x = torch.randn(shape).to(dtype)
            w = torch.rand(shape[-1]) + 0.5
            xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
            yc = ops.rms_norm(xc, wc)
            g = torch.randn(shape).to(dtype)
            yc.backward(g.cuda())
            x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
            y1 = ops.rms_norm(x1, w1)
            y1.backward(g)
            ok &= check(f"rms_norm {shape} {dtype}", yc, y1, tol, tol)
            ok &= check(f"rms_norm grad_x {shape} {dtype}", xc.grad, x1.grad, 2 * tol, 2 * tol)
            ok &= check(f"rms_norm grad_scale {shape} {dtype}", wc.grad, w1.grad, 1e-3, 1e-3)
        rope = RotaryEmbedding()
        for shape in ((2, 7, 3, 64), (5, 8, 64)):
            x = torch.randn(shape).to(dtype)
            cos, sin = rope.cos_sin(torch.arange(shape[-3]) + 129)
            ok &= check(f"apply_rope {shape} {dtype}", ops.apply_rope(x.cuda(), cos.cuda(), sin.cuda()),
                        ops.apply_rope(x, cos, sin), tol, tol)
    torch.cuda.synchronize()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
