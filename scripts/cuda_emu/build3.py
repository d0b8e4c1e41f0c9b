import os, sys, time
os.environ.setdefault("MAX_JOBS", "2")
W = "/work/wt-attn-cuda"
sys.path.insert(0, W)
import torch
import gptoss_ext  # schemas
from torch.utils.cpp_extension import load
t = time.time()
extra = os.environ.get("EMU_CFLAGS", "-O2").split()
mod = load(name=os.environ.get("EMU_NAME", "attn_emu"),
           sources=["/tmp/emu/gen3/attention_fwd_emu.cpp", "/tmp/emu/gen3/attention_bwd_emu.cpp", f"{W}/csrc/common/checks.cpp"],
           extra_include_paths=[f"{W}/csrc", "/tmp/emu"], extra_cflags=extra + ["-mf16c", "-g0"],
           extra_ldflags=[], build_directory=os.environ.get("EMU_BUILD", "/tmp/emu/build"), is_python_module=False, verbose=False)
print("built in", time.time() - t)
