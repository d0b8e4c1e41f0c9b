"""Runs csrc/cuda/rms_norm.cu (the whole file: rms_norm, add_rms_norm and the backward, kernels and
host code) on the CPU emulator of emu.h and compares every result with the CPU kernels.

cuda/utils.cuh is inlined with its launch helper pointed at the emulator; the file's op
registration is replaced by a Python module (emu_build.whole_file). For sessions without a GPU; not part of the test
suite. Usage, from the repository root with the extension built:

    python scripts/cuda_emu/rms_norm_emu.py
"""
import sys

import torch

from emu_build import compile_module, whole_file

import gptoss_ext  # noqa: E402,F401  (the CPU kernels, the reference here)


def main():
    mod = compile_module("rms_norm_emu", whole_file("rms_norm.cu", ["rms_norm", "add_rms_norm", "rms_norm_backward"]))
    ops = torch.ops.gptoss_ext
    fails = 0
    # register kernels of 2880 (gpt-oss), several rows per warp (24), odd / misaligned rows (scalar
    # path), a long row (streaming kernel), float64 (streaming)
    for shape in [(3, 2880), (5, 24), (4, 769), (2, 20000)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
            x = (torch.randn(shape, generator=g) * 3).to(dtype)
            r = torch.randn(shape, generator=g).to(dtype)
            w = torch.randn(shape[-1], generator=g)
            if shape == (4, 769):  # misaligned x: the scalar kernels
                x = torch.randn(x.numel() + 1, generator=g).to(dtype)[1:].view(shape)
            y_e, s_e, rstd_e = mod.add_rms_norm(x, r, w, 1e-5)
            y_c, s_c, rstd_c = ops.add_rms_norm(x, r, w, 1e-5)
            y1_e, _ = mod.rms_norm(x, w, 1e-5)
            y1_c, _ = ops.rms_norm(x, w, 1e-5)
            tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
            ok = (torch.equal(s_e, s_c) and torch.allclose(y_e.double(), y_c.double(), rtol=tol, atol=tol)
                  and torch.allclose(rstd_e.double(), rstd_c.double(), rtol=tol) and
                  torch.allclose(y1_e.double(), y1_c.double(), rtol=tol, atol=tol))
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {shape} {dtype}: add_rms_norm max err "
                  f"{(y_e.double() - y_c.double()).abs().max().item():.3g}, sum equal {torch.equal(s_e, s_c)}")
    print("FAILED:", fails) if fails else print("all passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
