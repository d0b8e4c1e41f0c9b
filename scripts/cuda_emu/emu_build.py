"""Shared pieces of the CPU emulation scripts (gemv_emu.py, rms_norm_emu.py, linear_emu.py): cut
CUDA source apart, turn it into host C++ on emu.h, compile it as a Python module."""
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# Host stand-ins for the CUDA runtime and intrinsics the kernels use beyond what emu.h provides.
PRELUDE = r'''
#include <torch/extension.h>
#include "emu.h"

#include <cstdlib>
#include <limits>

inline int cudaGetDevice(int* d) { *d = 0; return 0; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }

// __any_sync over the 32 lanes of the calling warp (called warp-uniformly).
inline bool __any_sync(unsigned, bool p) {
  const int w = ::emu::warp(), l = ::emu::lane();
  ::emu::g_slot[w][l][0] = p ? 1u : 0u;
  ::emu::g_warp_bar[w].wait();
  bool r = false;
  for (int i = 0; i < 32; ++i) r = r || ::emu::g_slot[w][i][0] != 0;
  ::emu::g_warp_bar[w].wait();
  return r;
}
'''

def function_at(src, start):
    """The text of the definition beginning at `start` (a unique prefix) through its closing brace."""
    i = src.index(start)
    j = src.index("{", i)
    depth = 0
    for k in range(j, len(src)):
        depth += {"{": 1, "}": -1}.get(src[k], 0)
        if depth == 0:
            end = k + 1
            if src[end:end + 1] == ";":
                end += 1
            return src[i:end]
    raise ValueError(f"unbalanced braces after {start!r}")


def emu_launches(src):
    """kernel<<<grid, block, smem, stream>>>(args) -> ::emu::launch(kernel, grid, block, smem, args)."""
    pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);', re.S)
    src = pat.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2).rsplit(',', 1)[0]}, {m.group(3)});", src)
    assert "<<<" not in src
    return src


def strip_includes(s):
    return re.sub(r'#include <(c10/cuda/[^>]+|cuda_runtime\.h|cuda_bf16\.h|cuda_fp16\.h)>\n', "", s)


def whole_file(cu, exports):
    """Host C++ for csrc/cuda/<cu>: utils.cuh inlined (launches on the emulator), the CUDA
    registration replaced by a Python module exporting `exports` (names in gptoss::cuda)."""
    utils = strip_includes(open(os.path.join(ROOT, "csrc/cuda/utils.cuh")).read()).replace("#pragma once", "")
    src = strip_includes(open(os.path.join(ROOT, "csrc/cuda", cu)).read())
    src = src.replace('#include "cuda/utils.cuh"\n', "")
    src = src[:src.index("TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m)")] + "}  // namespace gptoss::cuda\n"
    src = src.replace("__shared__", "static")  # one CTA runs at a time: a static is its shared memory
    src = emu_launches(src)
    tail = "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n" + "".join(
        f'  m.def("{e}", &gptoss::cuda::{e});\n' for e in exports) + "}\n"
    return PRELUDE + utils + src + tail


def compile_module(name, text):
    """Compile the generated C++ `text` (plus the op checks) as the Python module `name`."""
    from torch.utils.cpp_extension import load
    out_dir = os.path.join(os.environ.get("EMU_BUILD", "/tmp"), name)
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, name + ".cpp")
    with open(src, "w") as f:
        f.write(text)
    t = time.time()
    mod = load(name=name, sources=[src, os.path.join(ROOT, "csrc/common/checks.cpp")],
               extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
               extra_cflags=["-O1", "-g0", "-mf16c", "-Wno-unknown-pragmas", "-std=c++20"], build_directory=out_dir)
    print(f"built in {time.time() - t:.0f} s")
    return mod
