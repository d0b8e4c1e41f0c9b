"""Runs csrc/cuda/rms_norm.cu (the whole file: rms_norm, add_rms_norm and the backward, kernels and
host code) on the CPU emulator of emu.h and compares every result with the CPU kernels.

cuda/utils.cuh is inlined with its launch helper pointed at the emulator; the file's op
registration is replaced by a Python module (generate/build here serve linear_emu.py too). For sessions without a GPU; not part of the test
suite. Usage, from the repository root with the extension built:

    python scripts/cuda_emu/rms_norm_emu.py
"""
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]
import gptoss_ext  # noqa: E402,F401  (the CPU kernels, the reference here)
from gemv_emu import function_at  # noqa: E402

PRELUDE = r'''
#include <torch/extension.h>
#include "emu.h"

inline int cudaGetDevice(int* d) { *d = 0; return 0; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
'''


def strip_includes(s):
    return re.sub(r'#include <(c10/cuda/[^>]+|cuda_runtime\.h|cuda_bf16\.h|cuda_fp16\.h)>\n', "", s)


def generate(cu, exports, path):
    """Host C++ for csrc/cuda/<cu>: utils.cuh inlined (launches on the emulator), the CUDA
    registration replaced by a Python module exporting `exports` (names in gptoss::cuda)."""
    utils = strip_includes(open(os.path.join(ROOT, "csrc/cuda/utils.cuh")).read()).replace("#pragma once", "")
    launch = function_at(utils, "template <typename... Params, typename... Args>\nvoid launch_pdl")
    utils = utils.replace(launch, '''template <typename K, typename... Args>
void launch_pdl(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  ::emu::launch(kernel, grid, block, smem, args...);
}''')
    utils = utils.replace(function_at(utils, "inline bool pdl_enabled()"), "inline bool pdl_enabled() { return false; }")
    src = strip_includes(open(os.path.join(ROOT, "csrc/cuda", cu)).read())
    src = src.replace('#include "cuda/utils.cuh"\n', "")
    src = src[:src.index("TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m)")] + "}  // namespace gptoss::cuda\n"
    src = src.replace("__shared__", "static")  # one CTA runs at a time: a static is its shared memory
    pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);', re.S)
    src = pat.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2).rsplit(',', 1)[0]}, {m.group(3)});", src)
    assert "<<<" not in src
    tail = "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n" + "".join(
        f'  m.def("{e}", &gptoss::cuda::{e});\n' for e in exports) + "}\n"
    with open(path, "w") as f:
        f.write(PRELUDE + utils + src + tail)


def build(cu, exports, name):
    from torch.utils.cpp_extension import load
    out_dir = os.path.join(os.environ.get("EMU_BUILD", "/tmp"), name)
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, name + ".cpp")
    generate(cu, exports, src)
    t = time.time()
    mod = load(name=name, sources=[src, os.path.join(ROOT, "csrc/common/checks.cpp")],
               extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
               extra_cflags=["-O1", "-g0", "-mf16c", "-Wno-unknown-pragmas", "-std=c++20"], build_directory=out_dir)
    print(f"built in {time.time() - t:.0f} s")
    return mod


def main():
    mod = build("rms_norm.cu", ["rms_norm", "add_rms_norm", "rms_norm_backward"], "rms_norm_emu")
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
