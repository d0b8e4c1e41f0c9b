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
        # linear: the GEMV kernel (<= 4 rows, bf16, K % 8 == 0; odd N) and cuBLAS (5 rows, K % 8 != 0)
        for m, n, kk in ((1, 33, 264), (4, 7, 72), (5, 9, 64), (2, 5, 36)):
            x, w, b = torch.randn(m, kk).to(dtype), torch.randn(n, kk).to(dtype), torch.randn(n).to(dtype)
            ok &= check(f"linear [{m}, {kk}] x [{n}, {kk}] {dtype}", ops.linear(x.cuda(), w.cuda(), b.cuda()),
                        ops.linear(x, w, b), 4 * tol, 4 * tol)
        rope = RotaryEmbedding()
        for shape in ((2, 7, 3, 64), (5, 8, 64)):
            x = torch.randn(shape).to(dtype)
            cos, sin = rope.cos_sin(torch.arange(shape[-3]) + 129)
            ok &= check(f"apply_rope {shape} {dtype}", ops.apply_rope(x.cuda(), cos.cuda(), sin.cuda()),
                        ops.apply_rope(x, cos, sin), tol, tol)
        # attention: prefill forward/backward (window, GQA, sinks, q_offset), append + decode
        for (b, tq, tk, hq, hkv, d, window, off) in ((1, 7, 7, 4, 2, 64, 0, 0), (2, 33, 160, 8, 2, 64, 16, 127),
                                                     (1, 5, 5, 2, 1, 40, 3, 0)):
            q = torch.randn(b, tq, hq, d).to(dtype)
            k = torch.randn(b, tk, hkv, d).to(dtype)
            v = torch.randn(b, tk, hkv, d).to(dtype)
            sinks = torch.randn(hq)
            g = torch.randn(b, tq, hq, d).to(dtype)
            grads = []
            outs = []
            for dev in ("cuda", "cpu"):
                qq, kk, vv, ss = (t.to(dev).requires_grad_() for t in (q, k, v, sinks))
                out, lse = ops.attention(qq, kk, vv, ss, window=window, q_offset=off)
                out.backward(g.to(dev))
                outs.append((out, lse))
                grads.append((qq.grad, kk.grad, vv.grad, ss.grad))
            name = f"attention b{b} tq{tq} tk{tk} h{hq}/{hkv} d{d} w{window} off{off} {dtype}"
            ok &= check(name, outs[0][0], outs[1][0], 2 * tol, 2 * tol)
            ok &= check(name + " lse", outs[0][1], outs[1][1], 1e-3, 1e-3)
            for label, gc, g1 in zip(("dq", "dk", "dv", "dsinks"), grads[0], grads[1]):
                ok &= check(f"{name} {label}", gc, g1, 4 * tol, 4 * tol)
        for window in (0, 8):
            b, hq, hkv, d, steps = 3, 8, 2, 64, 20
            res = []
            for dev in ("cuda", "cpu"):
                cache = gptoss_ext.KVCache(b, 32, hkv, d, window=window, dtype=dtype, device=dev)
                torch.manual_seed(1)
                last = None
                for _ in range(steps):
                    kk, vv = (torch.randn(b, 1, hkv, d).to(dtype).to(dev) for _ in range(2))
                    cache.append(kk, vv)
                    last, _ = cache.attend(torch.randn(b, 1, hq, d).to(dtype).to(dev), torch.randn(hq).to(dev))
                    cache.advance(1)
                res.append(last)
            ok &= check(f"kv cache decode window {window} {dtype}", res[0], res[1], 2 * tol, 2 * tol)
    torch.cuda.synchronize()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
