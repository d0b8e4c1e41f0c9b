"""apply_rope: our kernel vs the eager PyTorch composite (rotate-half written with slicing and
cat), GB/s against the copy bandwidth measured in the same run. Shapes from the gpt-oss-20b
config: the query tensor of a 4096-token prefill [1, 4096, 64, 64] and of an 8-sequence decode
step [8, 1, 64, 64], plus the key tensor [1, 4096, 8, 64]."""
import argparse

import torch

import gptoss_ext
from gptoss import ModelConfig
from gptoss_ext import RotaryEmbedding, ops
from common import commit, copy_bandwidth, machine, print_table, time_fn


def eager(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and gptoss_ext.has_cuda_kernels() else "cpu")
    dev = parser.parse_args().device
    cfg = ModelConfig.preset("gpt-oss-20b")
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
                           cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    bw = copy_bandwidth(dev)
    print(f"machine: {machine()}; commit {commit()}; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    shapes = [("prefill q", (1, 4096, cfg.num_attention_heads, cfg.head_dim), None),
              ("prefill k", (1, 4096, cfg.num_key_value_heads, cfg.head_dim), None),
              ("decode q", (8, 1, cfg.num_attention_heads, cfg.head_dim), 1000)]
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape, offset in shapes:
            x = torch.randn(shape, device=dev).to(dtype)
            if offset is None:
                cos, sin = rope.cos_sin(torch.arange(shape[1], device=dev))
            else:  # per-sequence positions (ragged decode)
                cos, sin = rope.cos_sin(torch.arange(shape[0], device=dev)[:, None] * 7 + offset)
            nbytes = 2 * x.numel() * x.element_size()
            ours = time_fn(lambda: ops.apply_rope(x, cos, sin), dev)
            base = time_fn(lambda: eager(x, cos, sin), dev)
            for impl, t in (("gptoss_ext", ours), ("eager composite", base)):
                rows.append([name, str(list(shape)), str(dtype).replace("torch.", ""), dev, impl, t * 1e3,
                             nbytes / t / 1e9, nbytes / t / bw, t / ours])
    print_table("apply_rope forward", ["case", "shape", "dtype", "device", "impl", "ms", "GB/s", "of copy BW",
                                        "time / ours"], rows)


if __name__ == "__main__":
    main()
