"""Every MoE CUDA op once on small, awkward shapes (each kernel path: tensor-core and SIMT grouped
GEMMs, the MXFP4 decode GEMV and prefill kernels, the counting sort across several chunks, bad-input
NaN rows), compared with the CPU kernel when the build has it, else with the float64 oracle. Small
enough to run under compute-sanitizer (memcheck, racecheck) in seconds; exits non-zero on a mismatch.

`--bench` instead times the gpt-oss-20b-shaped grouped GEMMs (not under the sanitizer): the dense
bfloat16 prefill GEMM against cuBLAS on the same FLOPs, and the MXFP4 kernels in effective weight
bytes per second (decode) and TFLOP/s (prefill).
"""
import math
import os
import sys

import torch

import gptoss_ext
from gptoss_ext import reference

C = torch.ops.gptoss_ext
ALPHA, LIMIT = 1.702, 7.0
HAS_CPU = torch._C._dispatch_has_kernel_for_dispatch_key("gptoss_ext::moe_grouped_gemm", "CPU")


def check(name, cuda_out, expect, atol, rtol):
    a, b = cuda_out.detach().cpu().double(), expect.detach().cpu().double()
    ok = a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
    print(f"{name}: {'ok' if ok else 'MISMATCH'}")
    return ok


def same(name, cuda_out, expect):
    ok = torch.equal(cuda_out.cpu(), expect.cpu())
    print(f"{name}: {'ok' if ok else 'MISMATCH'}")
    return ok


def routing(T, E, k):
    return torch.randn(T, E).topk(k, -1).indices.int()


def dispatch_oracle(experts, E):
    flat = experts.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(flat, minlength=E).cumsum(0)
    return order.int(), (order // experts.shape[1]).int(), offsets.int()


def gemm_expect(x, ri, offsets, w, b, fused):
    """The CPU kernel, or the float64 oracle (w: dense [E, M, K] or an MXFP4 pair)."""
    if HAS_CPU:
        if isinstance(w, tuple):
            return C.moe_grouped_gemm_mxfp4(x, ri, offsets, w[0], w[1], b, fused, ALPHA, LIMIT)
        return C.moe_grouped_gemm(x, ri, offsets, w, b, fused, ALPHA, LIMIT)
    w64 = reference.mxfp4_dequantize(w[0], w[1], torch.float64) if isinstance(w, tuple) else w.double()
    rows = x.double()[ri.long()] if ri is not None else x.double()
    offs = offsets.tolist()
    h = torch.zeros(rows.shape[0], w64.shape[1], dtype=torch.float64)
    for e in range(w64.shape[0]):
        h[offs[e]:offs[e + 1]] = rows[offs[e]:offs[e + 1]] @ w64[e].t() + (b[e].double() if b is not None else 0)
    return reference.swiglu(h, ALPHA, LIMIT) if fused else h


def cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


def main():
    assert torch.cuda.is_available() and gptoss_ext.has_cuda_kernels(), "needs a GPU and a CUDA build"
    torch.manual_seed(0)
    print(f"reference: {'CPU kernels' if HAS_CPU else 'float64 oracle (no CPU MoE kernels in this build)'}")
    ok = True
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

    # routing, with ties
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randint(-3, 4, (19, 32)).to(dtype)
        w, ex = C.moe_route(logits.cuda(), 4)
        w_ref, ex_ref = C.moe_route(logits, 4) if HAS_CPU else reference.moe_route(logits, 4)
        ok &= same(f"moe_route experts {dtype}", ex, ex_ref)
        ok &= check(f"moe_route weights {dtype}", w, w_ref, 1e-5, 1e-5)
        g = torch.randn(19, 4)
        gl = C.moe_route_backward(g.cuda(), w, ex, 32)
        gl_ref = torch.zeros(19, 32).scatter_(1, ex_ref.long(), w_ref * (g - (w_ref * g).sum(-1, keepdim=True)))
        ok &= check(f"moe_route_backward {dtype}", gl, gl_ref, 1e-5, 1e-5)

    # dispatch: one chunk, several chunks, out-of-range ids
    for T, E, k in ((13, 32, 4), (1000, 128, 4)):
        experts = routing(T, E, k)
        for name, a, b in zip(("order", "row_token", "offsets"), C.moe_dispatch(experts.cuda(), E),
                              dispatch_oracle(experts, E)):
            ok &= same(f"moe_dispatch {name} T={T}", a, b)
    bad = routing(9, 8, 2)
    bad[4, 1] = 99
    ok &= same("moe_dispatch bad id -> offsets[E] < N", C.moe_dispatch(bad.cuda(), 8)[2][-1], torch.tensor(17))

    # swiglu (vector and scalar paths)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((3, 2 * 40), (5, 2 * 7)):
            h = (torch.randn(shape) * 5).to(dtype)
            g = torch.randn(shape[0], shape[1] // 2).to(dtype)
            ref = C.swiglu(h, ALPHA, LIMIT) if HAS_CPU else reference.swiglu(h.double(), ALPHA, LIMIT)
            ok &= check(f"swiglu {shape} {dtype}", C.swiglu(h.cuda(), ALPHA, LIMIT), ref, tol[dtype], tol[dtype])
            hr = h.double().requires_grad_()
            reference.swiglu(hr, ALPHA, LIMIT).backward(g.double())
            ok &= check(f"swiglu_backward {shape} {dtype}", C.swiglu_backward(g.cuda(), h.cuda(), ALPHA, LIMIT),
                        hr.grad, 2 * tol[dtype], 2 * tol[dtype])

    # dense grouped GEMM: tensor cores (bf16, K % 8 == 0), SIMT (f32; bf16 with K % 8 != 0)
    for dtype, K in ((torch.bfloat16, 64), (torch.float32, 40), (torch.bfloat16, 36)):
        T, E, k, M = 21, 4, 2, 66
        experts = routing(T, E, k)
        _, ri, offsets = dispatch_oracle(experts, E)
        x = torch.randn(T, K).to(dtype)
        w = (torch.randn(E, M, K) / math.sqrt(K)).to(dtype)
        b = torch.randn(E, M).to(dtype)
        for fused in (False, True):
            out = C.moe_grouped_gemm(*cuda(x, ri, offsets, w, b), fused, ALPHA, LIMIT)
            ok &= check(f"moe_grouped_gemm K={K} fused={fused} {dtype}", out, gemm_expect(x, ri, offsets, w, b, fused),
                        2 * tol[dtype], 2 * tol[dtype])
        g = torch.randn(T * k, M).to(dtype)
        gx, gw, gb = C.moe_grouped_gemm_backward(*cuda(g, x, ri, offsets, w), [True, True, True])
        xr, wr, br = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
        rows, offs = xr[ri.long()], offsets.tolist()
        torch.cat([rows[offs[e]:offs[e + 1]] @ wr[e].t() + br[e] for e in range(E)]).backward(g.double())
        for name, a, r in (("grad_x", gx, xr.grad), ("grad_weight", gw, wr.grad), ("grad_bias", gb, br.grad)):
            ok &= check(f"moe_grouped_gemm_backward {name} K={K} {dtype}", a, r, 4 * tol[dtype], 4 * tol[dtype])

    # bad grouping: NaN rows, no out-of-bounds access
    ri_bad = ri.clone()
    ri_bad[3] = 10 ** 6
    off_bad = offsets.clone()
    off_bad[-1] -= 2
    out = C.moe_grouped_gemm(*cuda(x, ri_bad, off_bad, w, b), False, ALPHA, LIMIT).cpu()
    good = torch.ones(out.shape[0], dtype=torch.bool)
    good[3] = False
    good[-2:] = False
    nan_ok = bool(torch.isnan(out[~good]).all() and torch.isfinite(out[good]).all())
    print(f"moe_grouped_gemm bad grouping -> NaN rows: {'ok' if nan_ok else 'MISMATCH'}")
    ok &= nan_ok

    # MXFP4 grouped GEMM: decode GEMV (N <= 32 E), prefill tensor cores, SIMT (f32 / f16)
    E, M, K = 4, 40, 96
    blocks = torch.randint(0, 256, (E, M, K // 32, 16), dtype=torch.uint8)
    scales = torch.randint(118, 131, (E, M, K // 32), dtype=torch.uint8)
    for dtype, T in ((torch.bfloat16, 5), (torch.bfloat16, 50), (torch.bfloat16, 150), (torch.float32, 9),
                     (torch.float16, 9)):
        experts = routing(T, E, 1)
        _, ri, offsets = dispatch_oracle(experts, E)
        x = torch.randn(T, K).to(dtype)
        b = torch.randn(E, M).to(dtype)
        for fused in (False, True):
            out = C.moe_grouped_gemm_mxfp4(*cuda(x, ri, offsets, blocks, scales, b), fused, ALPHA, LIMIT)
            ok &= check(f"moe_grouped_gemm_mxfp4 T={T} fused={fused} {dtype}", out,
                        gemm_expect(x, ri, offsets, (blocks, scales), b, fused), 2 * tol[dtype] * 10,
                        2 * tol[dtype])

    # moe_experts_mxfp4: the decode launches (bf16, T k <= 256: one prep block, two GEMVs, combine)
    # against the op sequence, and T k = 260 (the op sequence itself) against the CPU kernel
    E, d, I, k = 8, 64, 32, 4
    b1, s1 = torch.randint(0, 256, (E, 2 * I, d // 32, 16), dtype=torch.uint8), torch.randint(
        119, 123, (E, 2 * I, d // 32), dtype=torch.uint8)
    b2, s2 = torch.randint(0, 256, (E, d, I // 32, 16), dtype=torch.uint8), torch.randint(
        119, 123, (E, d, I // 32), dtype=torch.uint8)
    bias1, bias2 = (torch.randn(E, 2 * I) * 0.1).bfloat16(), (torch.randn(E, d) * 0.1).bfloat16()
    for T in (1, 3, 65):
        x, logits = torch.randn(T, d).bfloat16(), torch.randn(T, E).bfloat16()
        got = C.moe_experts_mxfp4(*cuda(x, logits), k, *cuda(b1, s1, bias1, b2, s2, bias2), ALPHA, LIMIT)
        w, ex = C.moe_route(*cuda(logits), k)
        order, row_token, offsets = C.moe_dispatch(ex, E)
        a = C.moe_grouped_gemm_mxfp4(*cuda(x), row_token, offsets, *cuda(b1, s1, bias1), True, ALPHA, LIMIT)
        y = C.moe_grouped_gemm_mxfp4(a, None, offsets, *cuda(b2, s2, bias2), False, ALPHA, LIMIT)
        ok &= same(f"moe_experts_mxfp4 T={T} vs the op sequence", got, C.moe_combine(y, order, w))
        if HAS_CPU:
            cpu = C.moe_experts_mxfp4(x, logits, k, b1, s1, bias1, b2, s2, bias2, ALPHA, LIMIT)
            ok &= check(f"moe_experts_mxfp4 T={T} vs CPU", got, cpu, 4 * tol[torch.bfloat16],
                        4 * tol[torch.bfloat16])

    # combine
    for dtype in (torch.float32, torch.bfloat16):
        T, E, k, d = 11, 8, 4, 24
        order = dispatch_oracle(routing(T, E, k), E)[0]
        y = torch.randn(T * k, d).to(dtype)
        wts = torch.softmax(torch.randn(T, k), -1)
        g = torch.randn(T, d).to(dtype)
        inv = torch.empty_like(order)
        inv[order.long()] = torch.arange(T * k, dtype=torch.int32)
        yr, wr = y.double().requires_grad_(), wts.double().requires_grad_()
        ref = (yr[inv.long()].view(T, k, d) * wr.unsqueeze(-1)).sum(1)
        ref.backward(g.double())
        ok &= check(f"moe_combine {dtype}", C.moe_combine(*cuda(y, order, wts)), ref, tol[dtype], tol[dtype])
        gy, gw = C.moe_combine_backward(*cuda(g, y, order, wts))
        ok &= check(f"moe_combine_backward grad_y {dtype}", gy, yr.grad, tol[dtype], tol[dtype])
        ok &= check(f"moe_combine_backward grad_weights {dtype}", gw, wr.grad, 4 * tol[dtype], 4 * tol[dtype])

    # MXFP4 codec: every byte at every scale, bit-exact; quantize vs the oracle
    bl = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(256, 1, 1)
    sc = torch.arange(256, dtype=torch.uint8).view(256, 1).repeat(1, 16)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        ok &= same(f"mxfp4_dequantize {dtype}", C.mxfp4_dequantize(bl.cuda(), sc.cuda(), dtype).view(bits),
                   reference.mxfp4_dequantize(bl, sc, dtype).view(bits))
    wq = torch.randn(7, 96) * torch.logspace(-8, 8, 7).unsqueeze(-1)
    for a, r in zip(C.mxfp4_quantize(wq.cuda()), reference.mxfp4_quantize(wq)):
        ok &= same("mxfp4_quantize", a, r)

    torch.cuda.synchronize()
    print("ALL OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


def _time_ms(fn, iters=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench():
    """gpt-oss-20b MoE GEMM shapes: E = 32, k = 4, d = I = 2880 (mlp1: M = 5760 fused, mlp2: M = 2880)."""
    torch.manual_seed(0)
    E, k, d, I = 32, 4, 2880, 2880
    print(f"device: {torch.cuda.get_device_name()}")
    src = torch.empty(1 << 28, device="cuda").uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.nbytes / _time_ms(lambda: dst.copy_(src)) / 1e6  # read + write, measured now
    del src, dst
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    for T in (4096,):
        experts = routing(T, E, k).cuda()
        _, ri, offsets = C.moe_dispatch(experts, E)
        N = T * k
        x = torch.randn(T, d, device="cuda").bfloat16()
        w1 = (torch.randn(E, 2 * I, d, device="cuda") / math.sqrt(d)).bfloat16()
        b1 = torch.randn(E, 2 * I, device="cuda").bfloat16()
        flops = 2.0 * N * 2 * I * d
        ms = _time_ms(lambda: C.moe_grouped_gemm(x, ri, offsets, w1, b1, True, ALPHA, LIMIT))
        a = torch.randn(N, d, device="cuda").bfloat16()
        wd = w1[0].t().contiguous()
        ms_cublas = _time_ms(lambda: a @ wd)
        print(f"dense bf16 grouped GEMM mlp1 T={T}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s; cuBLAS dense "
              f"[{N}x{d}]@[{d}x{2 * I}]: {ms_cublas:.3f} ms, {flops / ms_cublas / 1e9:.0f} TFLOP/s; "
              f"ratio {ms_cublas / ms:.2f}")
    for T in (1, 8, 64, 4096):
        experts = routing(T, E, k).cuda()
        _, ri, offsets = C.moe_dispatch(experts, E)
        active = experts.unique().numel()
        for name, M, K in (("mlp1", 2 * I, d), ("mlp2", d, I)):
            blocks = torch.randint(0, 256, (E, M, K // 32, 16), dtype=torch.uint8, device="cuda")
            scales = torch.randint(119, 123, (E, M, K // 32), dtype=torch.uint8, device="cuda")
            b = torch.randn(E, M, device="cuda").bfloat16()
            fused = name == "mlp1"
            xin = torch.randn(T if fused else T * k, K, device="cuda").bfloat16()
            rin = ri if fused else None
            ms = _time_ms(lambda: C.moe_grouped_gemm_mxfp4(xin, rin, offsets, blocks, scales, b, fused, ALPHA, LIMIT))
            wbytes = active * M * (K // 2 + K // 32)
            tflops = 2.0 * T * k * M * K / ms / 1e9
            print(f"MXFP4 {name} T={T} ({active} experts): {ms:.3f} ms, {wbytes / ms / 1e6:.0f} GB/s of weights "
                  f"({wbytes / ms / 1e6 / copy_gbs * 100:.0f}% of the copy bandwidth), {tflops:.1f} TFLOP/s")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench()
    else:
        main()
