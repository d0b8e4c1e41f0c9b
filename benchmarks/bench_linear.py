"""linear: the dense projections of gpt-oss-20b at decode shapes (1, 2 and 4 rows of x; 8 rows already go to at::linear), ours vs
torch.nn.functional.linear (the device's BLAS: oneDNN on the CPU), bfloat16, at each thread
count, as weight GB/s against the copy bandwidth measured at that thread count. The weights
rotate through copies larger than the last-level cache, so every call reads them from memory.
Prefill-sized calls go to at::linear on both sides (one row at 512 rows shows it).

--device cuda: the same rows on the GPU, ours (the decode GEMV kernel up to 4 rows, cuBLAS above)
against F.linear (cuBLAS), with 20 calls per timed sample."""
import argparse

import torch
import torch.nn.functional as F

from gptoss import ModelConfig
from gptoss_ext import ops
from common import copy_bandwidth, machine, commit, print_table, time_fn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    dev = args.device
    threads = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if dev == "cuda":
        threads = threads[:1]
    cfg = ModelConfig.preset("gpt-oss-20b")
    d, hd, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = [("qkv", hd * (hq + 2 * hkv), d), ("out", d, hd * hq), ("router", cfg.num_experts, d),
              ("unembedding", cfg.vocab_size, d)]
    print(f"machine: {machine()}; commit {commit()}")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        bw = copy_bandwidth(dev)
        for name, n, k in shapes:
            nbytes = n * k * 2
            copies = max(1, min(8, (512 << 20) // nbytes))  # >= 512 MB of weights, or one huge one
            ws = [torch.randn(n, k, device=dev).bfloat16() for _ in range(copies)]
            b = torch.randn(n, device=dev).bfloat16() if name != "unembedding" else None
            for m in ((1, 2, 4, 8, 512) if name == "qkv" else (1, 2, 4)):
                x = torch.randn(m, k, device=dev).bfloat16()
                turn = [0]

                def call(fn):
                    def run():
                        turn[0] = (turn[0] + 1) % copies
                        fn(x, ws[turn[0]], b)
                    return run
                inner = 20 if dev == "cuda" else 1
                ours = time_fn(call(ops.linear), dev, min_time=0.5, inner=inner)
                base = time_fn(call(F.linear), dev, min_time=0.5, inner=inner)
                rows.append([nt, f"{bw / 1e9:.1f}", name, f"[{n}, {k}]", m, f"{ours * 1e3:.3f}",
                             f"{nbytes / ours / bw:.2f}", f"{base * 1e3:.3f}", f"{nbytes / base / bw:.2f}",
                             f"{base / ours:.2f}"])
    print_table(f"linear, bfloat16, {dev.upper()}: weight bytes per call over the time, against the copy bandwidth (read + write)",
                ["threads", "copy GB/s", "projection", "weight", "rows", "ours ms", "ours of copy BW", "F.linear ms",
                 "F.linear of copy BW", "F.linear / ours"], rows)


if __name__ == "__main__":
    main()
