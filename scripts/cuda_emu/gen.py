"""Turns csrc/cuda/attention_{fwd,bwd}.cu into host C++ running on the emulator (emu.h)."""
import re, sys
W = sys.argv[1]
out_dir = sys.argv[2]
for name in ("attention_fwd", "attention_bwd"):
    s = open(f"{W}/csrc/cuda/{name}.cu").read()
    # CUDA headers -> emulator
    s = re.sub(r'#include <c10/cuda/[^>]+>\n', '', s)
    s = re.sub(r'#include <cuda_(bf16|fp16|runtime)\.h>\n', '', s)
    s = s.replace('#include <torch/library.h>\n', '#include <torch/library.h>\n#include "emu.h"\n', 1)
    # PTX wrappers -> emulator's (keep swz)
    a = s.index("// ------------------------------------------------------------------------- PTX wrappers")
    b = s.index("// Shared-memory tiles", a)
    s = s[:a] + s[b:]
    s = re.sub(r'extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];',
               r'unsigned char* \1 = ::emu::smem_raw();', s)
    s = s.replace("__shared__", "static")
    s = s.replace("__align__(128)", "alignas(128)")
    # kernel launches
    pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);', re.S)
    n = len(pat.findall(s))
    s = pat.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2).rsplit(',', 1)[0]}, {m.group(3)});", s)
    assert "<<<" not in s, name
    s = s.replace(".is_cuda()", ".is_cpu()")
    s = s.replace("TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m)", "TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m)")
    open(f"{out_dir}/{name}_emu.cpp", "w").write(s)
    print(name, "launches:", n)
