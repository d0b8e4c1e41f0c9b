"""rms_norm: our kernel vs the eager PyTorch composite vs torch.nn.functional.rms_norm (and our
CUDA kernel vs the same baselines when a GPU is present), with GB/s against the copy bandwidth
measured in the same run. Shapes: gpt-oss prefill [4096, hidden] and decode [8, hidden].
add_rms_norm vs the add followed by our rms_norm or the eager composite (prefill and one decode
row)."""
import argparse

import torch
import torch.nn.functional as F

import gptoss_ext
from gptoss import ModelConfig
from gptoss_ext import ops
from common import copy_bandwidth, machine, commit, print_table, time_fn


def eager(x, w, eps=1e-5):  # the composite a user would write (spec §2.1 semantics)
    xf = x.float()
    return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * w).to(x.dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and gptoss_ext.has_cuda_kernels() else "cpu")
    args = parser.parse_args()
    dev = args.device
    d = ModelConfig.preset("gpt-oss-20b").hidden_size
    bw = copy_bandwidth(dev)
    print(f"machine: {machine()}; commit {commit()}; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (4096, 8):
            x = torch.randn(n, d, device=dev).to(dtype)
            w = torch.rand(d, device=dev) + 0.5
            nbytes = 2 * x.numel() * x.element_size()  # read x, write y
            ours = time_fn(lambda: ops.rms_norm(x, w), dev)
            base = {"eager composite": time_fn(lambda: eager(x, w), dev),
                    "F.rms_norm": time_fn(lambda: F.rms_norm(x, (d,), w.to(dtype), 1e-5), dev)}
            for name, t in [("gptoss_ext", ours)] + list(base.items()):
                rows.append([f"[{n}, {d}]", str(dtype).replace("torch.", ""), dev, name, t * 1e3,
                             nbytes / t / 1e9, nbytes / t / bw, t / ours])
    print_table("rms_norm forward", ["shape", "dtype", "device", "impl", "ms", "GB/s", "of copy BW", "time / ours"], rows)

    # add_rms_norm (the model's residual add closed by the next norm) vs the two ops it replaces
    arows = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (4096, 1):
            x = torch.randn(n, d, device=dev).to(dtype)
            r = torch.randn(n, d, device=dev).to(dtype)
            w = torch.rand(d, device=dev) + 0.5
            nbytes = 4 * x.numel() * x.element_size()  # read x, residual; write sum, out
            fns = {"gptoss_ext add_rms_norm": lambda: ops.add_rms_norm(x, r, w),
                   "x + r, then ops.rms_norm": lambda: ops.rms_norm(x + r, w),
                   "x + r, then eager composite": lambda: eager(x + r, w)}
            # two rounds in opposite orders, the lower median of each (on a shared CPU the first
            # of a sequence of timings runs measurably slower)
            times = {name: time_fn(fn, dev) for name, fn in fns.items()}
            for name, fn in reversed(list(fns.items())):
                times[name] = min(times[name], time_fn(fn, dev))
            ours = times["gptoss_ext add_rms_norm"]
            for name, t in times.items():
                arows.append([f"[{n}, {d}]", str(dtype).replace("torch.", ""), dev, name, t * 1e3,
                              nbytes / t / 1e9, nbytes / t / bw, t / ours])
    print_table("add_rms_norm forward", ["shape", "dtype", "device", "impl", "ms", "GB/s", "of copy BW", "time / ours"],
                arows)

    brows = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4096, d, device=dev).to(dtype).requires_grad_()
        w = (torch.rand(d, device=dev) + 0.5).requires_grad_()
        g = torch.randn(4096, d, device=dev).to(dtype)
        y = ops.rms_norm(x, w)
        t_ours = time_fn(lambda: torch.autograd.grad(y, (x, w), g, retain_graph=True), dev)
        y2 = eager(x, w)
        t_eager = time_fn(lambda: torch.autograd.grad(y2, (x, w), g, retain_graph=True), dev)
        nbytes = 3 * x.numel() * x.element_size()  # read x, dy; write dx
        brows.append([f"[4096, {d}]", str(dtype).replace("torch.", ""), dev, t_ours * 1e3, nbytes / t_ours / 1e9,
                      t_eager * 1e3, t_eager / t_ours])
    print_table("rms_norm backward", ["shape", "dtype", "device", "ours ms", "ours GB/s", "eager ms", "eager / ours"], brows)


if __name__ == "__main__":
    main()
