"""The build: the CMake build of the same sources, the ISA guard, and the isolated-build message."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptoss_ext
from gptoss_ext import _isa

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_cpu_only(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    "-DGPTOSS_EXT_CUDA=OFF"], check=True, capture_output=True, env=env)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, env=env)
    libs = list((build / "gptoss_ext").glob("_C*.so"))
    assert len(libs) == 1, libs
    info = json.loads((build / "gptoss_ext" / "_build_info.json").read_text())
    assert info["cpu_isa"] == gptoss_ext.build_info["cpu_isa"] and info["cuda"] is False
    # A fresh interpreter (the namespace is already registered in this one) loads the module and
    # runs an op against the formula.
    code = f"""
import torch
torch.ops.load_library({str(libs[0])!r})
x = torch.randn(5, 2880); w = torch.rand(2880)
y = torch.ops.gptoss_ext.rms_norm(x, w, 1e-5)[0]
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
torch.testing.assert_close(y, ref)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"


def test_isolated_build_explains_how(tmp_path):
    # What a build-isolated `pip install .` runs: setup.py with setuptools but no torch importable.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            f"__file__ = {str(ROOT / 'setup.py')!r}; exec(compile(open(__file__).read(), __file__, 'exec'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "torch is not importable" in out.stderr


def test_isa_flags_and_guard():
    assert gptoss_ext.build_info["cpu_isa"] in ("avx512", "avx2", "generic")
    assert _isa.missing_cpu_features(gptoss_ext.build_info["cpu_isa"]) == []
    assert "-march=x86-64-v4" in _isa.cpu_isa_flags("avx512")
    assert "-march=x86-64-v3" in _isa.cpu_isa_flags("avx2")
    with pytest.raises(ValueError, match="GPTOSS_EXT_CPU_ISA must be one of"):
        _isa.cpu_isa_flags("sse9")


def test_build_info_matches_torch():
    assert gptoss_ext.build_info["torch"] == torch.__version__
    assert gptoss_ext.has_cuda_kernels() == bool(gptoss_ext.build_info["cuda"])
