"""Runs csrc/cuda/linear.cu (the decode GEMV and its launch logic) on the CPU emulator of emu.h and
compares it with the CPU kernel of `linear` on decode shapes (1-4 rows, bf16 and fp16, with and
without bias, gpt-oss's projection widths and awkward ones). For sessions without a GPU; not part
of the test suite. Usage, from the repository root with the extension built:

    python scripts/cuda_emu/linear_emu.py
"""
import sys

import torch

from emu_build import compile_module, whole_file

import gptoss_ext  # noqa: E402,F401  (the CPU kernel, the reference here)


def main():
    mod = compile_module("linear_emu", whole_file("linear.cu", ["linear"]))
    fails = 0
    # (rows, N, K): one row of gpt-oss's router and out projection, a few rows of odd widths
    for M, N, K in [(1, 32, 2880), (1, 2880, 4096), (2, 33, 520), (3, 17, 64), (4, 40, 136), (1, 1, 8)]:
        for dtype in (torch.bfloat16, torch.float16):
            for bias in (True, False):
                g = torch.Generator().manual_seed(M * 1000 + N + K)
                x = torch.randn(M, K, generator=g).to(dtype)
                w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
                b = torch.randn(N, generator=g).to(dtype) if bias else None
                got = mod.linear(x, w, b)
                want = torch.ops.gptoss_ext.linear(x, w, b)
                exact = (x.double() @ w.double().t() + (b.double() if bias else 0))
                tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
                err = (got.double() - exact).abs().max().item()
                ok = got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=tol, atol=tol) \
                    and err <= tol * max(1.0, exact.abs().max().item())
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} M={M} N={N} K={K} {dtype} bias={bias}: max err vs exact {err:.3g}")
    print("FAILED:", fails) if fails else print("all passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
