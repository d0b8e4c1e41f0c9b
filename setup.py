"""Build of gptoss_ext._C: CPU kernels always, CUDA kernels when torch and a toolkit allow.

Build it against the torch you already have:

    pip install --no-build-isolation -e .

Environment:
    GPTOSS_EXT_CUDA=0|1      force a CPU-only build (0) or require CUDA (1); default: auto
    GPTOSS_EXT_CPU_ISA=...   avx512 | avx2 | generic; default: the best this CPU supports
    TORCH_CUDA_ARCH_LIST     CUDA archs; default when no GPU is visible: 9.0 (H100/H200)
    CUDA_HOME                toolkit root; default /usr/local/cuda when it exists
"""
import glob
import json
import os
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
HOW_TO_BUILD = (
    "gptoss-ext compiles against the torch already installed in this environment, so it must be "
    "built without build isolation:\n\n"
    "    pip install torch            # any build: CPU, or CUDA to also compile the CUDA kernels\n"
    "    pip install --no-build-isolation -e .\n\n"
    "(or run `make test`, which makes .venv with the pinned requirements and builds there)."
)

try:
    import torch
except ImportError:  # build isolation, or no torch at all
    sys.exit("error: torch is not importable in the build environment.\n\n" + HOW_TO_BUILD)

# torch guesses /usr/local when CUDA_HOME is unset, and the link then fails on -lcudart.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "gptoss_ext"))
from _isa import cpu_isa_flags, detect_cpu_isa  # noqa: E402  (a file, not the package: no _C yet)

sys.path.pop(0)


def want_cuda() -> bool:
    mode = os.environ.get("GPTOSS_EXT_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit(f"error: GPTOSS_EXT_CUDA=1 but torch.version.cuda={torch.version.cuda} "
                     f"and CUDA_HOME={CUDA_HOME}; install a CUDA build of torch and a CUDA toolkit")
        return True
    return possible


def libstdcxx_link_args():
    """["-L<dir>"] with a libstdc++.so link when the compiler finds only the static libstdc++.a (an
    image without the libstdc++ development link): a static copy inside _C keeps its own locale
    tables, and formatting a number in an error message then crashes the process."""
    cxx = os.environ.get("CXX", "c++")

    def find(name):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        return out if os.path.isabs(out) and os.path.exists(out) else None

    if find("libstdc++.so"):
        return []
    runtime = find("libstdc++.so.6") or next(
        (p for p in ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6") if os.path.exists(p)), None)
    if runtime is None:
        return []
    d = os.path.join(HERE, "build", "libstdcxx-link")
    os.makedirs(d, exist_ok=True)
    link = os.path.join(d, "libstdc++.so")
    if not os.path.lexists(link):
        os.symlink(os.path.realpath(runtime), link)
    print(f"gptoss_ext: {cxx} has no libstdc++.so link: linking {os.path.realpath(runtime)} through {d}")
    return ["-L" + d]


with_cuda = want_cuda()
isa = os.environ.get("GPTOSS_EXT_CPU_ISA") or detect_cpu_isa()
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: build for H100/H200

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp", "-DGPTOSS_EXT_ISA=\"" + isa + "\""] + cpu_isa_flags(isa)
extra_compile_args = {"cxx": cxx_flags}
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("GPTOSS_EXT_WITH_CUDA", "1"))
    extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                                  "-DGPTOSS_EXT_WITH_CUDA=1"]
    # cuBLAS headers live in the torch wheel's nvidia folder, not in every toolkit install.
    nvidia_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    ext_cls = CUDAExtension
else:
    nvidia_inc = []
    ext_cls = CppExtension

ext = ext_cls(
    name="gptoss_ext._C",
    sources=sources,
    include_dirs=[os.path.join(HERE, "csrc")] + nvidia_inc,
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"] + libstdcxx_link_args(),
)

# Read before _C is loaded, so that a module built for AVX-512 refuses to load (with a message)
# on a CPU without it instead of dying on an illegal instruction.
with open(os.path.join(HERE, "gptoss_ext", "_build_info.json"), "w") as f:
    json.dump({"cpu_isa": isa, "cuda": with_cuda, "torch": torch.__version__,
               "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""}, f)

print(f"gptoss_ext: building with cuda={with_cuda}, cpu_isa={isa}, "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
