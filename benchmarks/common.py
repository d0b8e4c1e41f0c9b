"""Timing helpers shared by the benchmarks: median wall time, the machine's copy bandwidth measured
in the same run, a table printer, and the machine description recorded with each result."""
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cpu", min_time: float = 0.3, warmup: int = 2, max_iters: int = 1000,
            inner: int = 1) -> float:
    """Median seconds per call over at least `min_time` seconds (after `warmup` calls). Each timed
    sample runs `inner` calls back to back before one sync (short GPU calls, where a sync per call
    would dominate) and counts as sample time / inner."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 5) and len(times) < max_iters:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large tensor copy (read + write counted), the machine's practical
    memory bandwidth ceiling, measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    # On a GPU a copy takes ~0.1 ms: 20 back to back per sync keep the sync out of the figure.
    t = time_fn(lambda: dst.copy_(src), device, inner=20 if torch.device(device).type == "cuda" else 1)
    return 2 * nbytes / t


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
