"""CPU instruction-set choice for the native build (used by setup.py, CMake and at import).

The CPU kernels are compiled for one x86-64 level chosen at build time: x86-64-v4 (AVX-512
F/BW/DQ/VL/CD) when the building CPU has it, else x86-64-v3 (AVX2, FMA, F16C), else the generic
baseline. gptoss_ext checks the running CPU against the recorded choice before loading _C.
"""
import platform

# ISA name -> (flags for g++, /proc/cpuinfo flags the CPU must have)
_LEVELS = {
    "avx512": (["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
               ["avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"]),
    "avx2": (["-march=x86-64-v3", "-mtune=generic", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
             ["avx2", "fma", "f16c"]),
    "generic": ([], []),
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_cpu_isa() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    have = cpu_flags()
    for name in ("avx512", "avx2"):
        if all(flag in have for flag in _LEVELS[name][1]):
            return name
    return "generic"


def cpu_isa_flags(isa: str) -> list:
    if isa not in _LEVELS:
        raise ValueError(f"GPTOSS_EXT_CPU_ISA must be one of {sorted(_LEVELS)}, got {isa!r}")
    return list(_LEVELS[isa][0])


def missing_cpu_features(isa: str) -> list:
    if isa not in _LEVELS or platform.machine() not in ("x86_64", "AMD64"):
        return []
    have = cpu_flags()
    return [flag for flag in _LEVELS[isa][1] if flag not in have]
