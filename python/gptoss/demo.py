"""`make demo`: the native ops on real gpt-oss-20b shapes, each timed and checked against the
float64 oracle, on the CPU and (when present) the GPU.

Later the demo grows into the full model: a seeded model, a batched prefill, decode steps.
"""
import time

import torch

import gptoss_ext
from gptoss_ext import RotaryEmbedding, ops, reference

from .config import ModelConfig


def _time(fn, device, iters=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def op_cases(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """(name, shape text, run, oracle, bytes moved) for each op on gpt-oss shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    T = 512
    x = torch.randn(T, cfg.hidden_size, generator=g).to(device, dtype)
    scale = (torch.rand(cfg.hidden_size, generator=g) + 0.5).to(device)
    yield ("rms_norm", f"[{T}, {cfg.hidden_size}]", lambda: ops.rms_norm(x, scale, cfg.rms_norm_eps),
           lambda: reference.rms_norm(x.double(), scale.double(), cfg.rms_norm_eps), 2 * x.nbytes)

    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
                           cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    q = torch.randn(1, T, cfg.num_attention_heads, cfg.head_dim, generator=g).to(device, dtype)
    cos, sin = rope.cos_sin(torch.arange(T, device=device) + 4000)
    yield ("apply_rope (YaRN)", f"[1, {T}, {cfg.num_attention_heads}, {cfg.head_dim}]",
           lambda: ops.apply_rope(q, cos, sin),
           lambda: reference.apply_rope(q.double(), cos.double(), sin.double()), 2 * q.nbytes)


def main():
    cfg = ModelConfig.preset("gpt-oss-20b")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and gptoss_ext.has_cuda_kernels():
        devices.append(torch.device("cuda"))
    print(f"gptoss_ext build: {gptoss_ext.build_info}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"shapes from the gpt-oss-20b config: hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, head_dim {cfg.head_dim}\n")
    header = f"{'op':<20} {'shape':<18} {'device':<6} {'dtype':<9} {'time ms':>9} {'GB/s':>8} {'max |err| vs fp64':>18}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for dtype in (torch.bfloat16, torch.float32):
            for name, shape, run, oracle, nbytes in op_cases(cfg, device, dtype):
                t = _time(run, device)
                err = (run().double() - oracle()).abs().max().item()
                print(f"{name:<20} {shape:<18} {device.type:<6} {str(dtype)[6:]:<9} {t * 1e3:>9.3f} "
                      f"{nbytes / t / 1e9:>8.2f} {err:>18.3e}")


if __name__ == "__main__":
    main()
