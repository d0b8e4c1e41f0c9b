#!/usr/bin/env python3
"""Static check of the compiled CUDA kernels in a built gptoss_ext._C*.so (no GPU needed).

For every kernel whose (mangled) name matches one of the --mma patterns (default: the attention
tensor-core kernels, forward and backward), in every SASS architecture embedded in the library:
  - the SASS must contain tensor-core MMAs (HMMA, or HGMMA for wgmma) and ldmatrix loads (LDSM);
  - it must not touch local memory (no LDL/STL instructions; cuobjdump -res-usage reports
    STACK:0 and LOCAL:0), i.e. no register spills or stack arrays.
Every other gptoss kernel is listed with its counts for information; --strict-local also fails
on local-memory traffic there.

Prints one line per kernel and architecture and exits 1 when a check fails, 2 when the tools or
the library are missing.

    python scripts/check_sass.py [path/to/_C.so] [--mma REGEX ...] [--strict-local]

cuobjdump is looked up in $CUOBJDUMP, on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin, the PyPI
package nvidia-cuda-cuobjdump (site-packages/nvidia/*/bin) and triton's bundled copy.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MMA = [r"attn_fwd_mma_kernel", r"attn_bwd_dkdv_mma_kernel", r"attn_bwd_dq_mma_kernel"]
COUNTED = {
    "HMMA": re.compile(r"\bHMMA\b"),
    "HGMMA": re.compile(r"\bHGMMA\b"),
    "LDSM": re.compile(r"\bLDSM\b"),
    "LDGSTS": re.compile(r"\bLDGSTS\b"),
    "LDL": re.compile(r"\bLDL\b"),
    "STL": re.compile(r"\bSTL\b"),
}


def find_cuobjdump():
    cands = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "cuobjdump"))
    site = sysconfig.get_paths()["purelib"]
    cands += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "cuobjdump")))
    cands += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_cuobjdump", "bin", "cuobjdump")))
    cands += sorted(glob.glob(os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump")))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_library():
    libs = sorted(glob.glob(os.path.join(ROOT, "gptoss_ext", "_C*.so")))
    return libs[0] if libs else None


def short_name(mangled: str) -> str:
    """The kernel's own name and template arguments, without the namespace noise."""
    m = re.search(r"\d+((?:attn|kv|rms|rope|moe|mxfp4)[A-Za-z0-9_]*)", mangled)
    return m.group(1) if m else mangled


def parse_sass(text):
    """{(arch, kernel): {mnemonic: count}} from cuobjdump -sass output."""
    counts = defaultdict(lambda: defaultdict(int))
    arch, fn = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line) or re.match(r"\s*code for (sm_\w+)", line)
        if m:
            arch, fn = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[(arch, fn)]  # create the entry even for kernels with none of the counted ops
            continue
        if fn is None or "/*" not in line:
            continue
        for name, rx in COUNTED.items():
            if rx.search(line):
                counts[(arch, fn)][name] += 1
    return counts


def parse_res_usage(text):
    """{(arch, kernel): {"REG": n, "STACK": n, "LOCAL": n, "SHARED": n}} from cuobjdump -res-usage."""
    usage = {}
    arch, fn = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            usage[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return usage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("library", nargs="?", help="the built _C*.so (default: gptoss_ext/_C*.so)")
    ap.add_argument("--mma", action="append", help="regex of kernels that must use tensor cores "
                    f"(repeatable; default {DEFAULT_MMA})")
    ap.add_argument("--strict-local", action="store_true", help="fail on local memory in any kernel")
    ap.add_argument("--filter", default=r"gptoss", help="only list kernels matching this regex")
    args = ap.parse_args(argv)

    lib = args.library or find_library()
    if not lib or not os.path.isfile(lib):
        print(f"check_sass: library not found ({lib}); build with GPTOSS_EXT_CUDA=1 first", file=sys.stderr)
        return 2
    tool = find_cuobjdump()
    if tool is None:
        print("check_sass: cuobjdump not found (pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP)",
              file=sys.stderr)
        return 2
    mma_rx = [re.compile(p) for p in (args.mma or DEFAULT_MMA)]
    filt = re.compile(args.filter)

    sass = subprocess.run([tool, "-sass", lib], capture_output=True, text=True)
    if sass.returncode != 0:
        print(f"check_sass: {tool} -sass failed:\n{sass.stderr}", file=sys.stderr)
        return 2
    res = subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True)
    counts = parse_sass(sass.stdout)
    usage = parse_res_usage(res.stdout) if res.returncode == 0 else {}

    failures = []
    n_mma = 0
    print(f"{'arch':6} {'kernel':64} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'HMMA':>5} {'HGMMA':>5} {'LDSM':>5} "
          f"{'LDGSTS':>6} {'LDL':>4} {'STL':>4}  verdict")
    for (arch, fn), c in sorted(counts.items(), key=lambda kv: (short_name(kv[0][1]), kv[0][0] or "")):
        if not filt.search(fn):
            continue
        u = usage.get((arch, fn), {})
        is_mma = any(rx.search(fn) for rx in mma_rx)
        local = c["LDL"] + c["STL"] + u.get("STACK", 0) + u.get("LOCAL", 0)
        problems = []
        if is_mma:
            n_mma += 1
            if c["HMMA"] + c["HGMMA"] == 0:
                problems.append("no HMMA/HGMMA")
            if c["LDSM"] == 0:
                problems.append("no LDSM")
        if local and (is_mma or args.strict_local):
            problems.append("local memory (spills or stack)")
        verdict = ("FAIL: " + ", ".join(problems)) if problems else ("ok (tensor cores)" if is_mma else "ok")
        if problems:
            failures.append(f"{arch} {short_name(fn)}: {', '.join(problems)}")
        print(f"{arch or '?':6} {short_name(fn)[:64]:64} {u.get('REG', -1):>4} {u.get('STACK', -1):>5} "
              f"{u.get('LOCAL', -1):>5} {c['HMMA']:>5} {c['HGMMA']:>5} {c['LDSM']:>5} {c['LDGSTS']:>6} "
              f"{c['LDL']:>4} {c['STL']:>4}  {verdict}")
    if n_mma == 0:
        failures.append(f"no kernel matches {[r.pattern for r in mma_rx]} (was the library built with CUDA?)")
    if failures:
        print("\ncheck_sass: FAILED\n  " + "\n  ".join(failures))
        return 1
    print(f"\ncheck_sass: ok ({n_mma} tensor-core kernel variants checked in {os.path.basename(lib)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
