"""`make demo`: the model end to end on embedded defaults (no download).

1. The native ops on real gpt-oss-20b shapes, timed and checked against the float64 oracle.
2. A seeded `notebook-demo` model and a gpt-oss-20b-shaped model cut to 2 layers with MXFP4
   experts: configuration, parameter counts, a batched prefill of prompts of different lengths,
   decode steps through the KV cache, tokens/s, and which kernels ran. On a GPU machine the CUDA
   logits are compared with the CPU's.
"""
import time

import torch

import gptoss_ext
from gptoss_ext import RotaryEmbedding, ops, reference

from .config import ModelConfig
from .generate import generate
from .model import Transformer


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


def model_demo(name: str, cfg: ModelConfig, device: torch.device, mxfp4: bool, new_tokens: int):
    t0 = time.perf_counter()
    model = Transformer.from_config(cfg, seed=0, mxfp4=mxfp4, dtype=torch.bfloat16, device=device)
    build_s = time.perf_counter() - t0
    n_params = model.num_parameters()
    print(f"\n== {name} on {device.type} ({'MXFP4' if mxfp4 else 'bf16'} experts), built in {build_s:.1f} s")
    print(f"   layers {cfg.num_hidden_layers} ({', '.join(t.split('_')[0] for t in cfg.layer_types)}), "
          f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} x {cfg.head_dim}, "
          f"window {cfg.sliding_window}, experts {cfg.num_experts} top-{cfg.experts_per_token}, "
          f"vocab {cfg.vocab_size}, YaRN factor {cfg.rope_scaling_factor}")
    print(f"   parameters: {n_params:,} total")
    g = torch.Generator().manual_seed(1)
    lens = [23, 9, 16]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    with torch.no_grad():
        caches = model.new_caches(len(prompts), max(lens) + new_tokens)
        padded = torch.zeros(len(prompts), max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p)
        t0 = time.perf_counter()
        model(padded.to(device), caches, advance=lens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, prompts, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    print(f"   batched prefill of {len(lens)} prompts ({sum(lens)} tokens, lengths {lens}): "
          f"{sum(lens) / prefill_s:.1f} tok/s")
    print(f"   generate {new_tokens} tokens x {len(lens)} sequences (prefill + KV-cache decode, greedy): "
          f"{gen_s:.2f} s, {new_tokens * len(lens) / gen_s:.1f} tok/s; first sequence -> {out[0]}")
    return model, prompts


def chat_demo(model, question: str = "What is 2 + 2?", new_tokens: int = 8):
    from .harmony import Chat, render_prompt
    chat = Chat(model, reasoning_effort="low", max_new_tokens=new_tokens)
    t0 = time.perf_counter()
    reply = chat.send(question)
    dt = time.perf_counter() - t0
    n_prompt = len(render_prompt([("user", question)], "low"))
    print(f"   Harmony chat turn {question!r}: {n_prompt}-token prompt (o200k_harmony), {len(reply.tokens)} "
          f"tokens in {dt:.2f} s; random weights, so the reply is noise: {reply.final[:60]!r}")


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

    models = [("notebook-demo", ModelConfig.preset("notebook-demo"), False, 8),
              ("gpt-oss-20b cut to 2 layers", ModelConfig.preset("gpt-oss-20b", num_hidden_layers=2), True, 4)]
    for name, mcfg, mxfp4, steps in models:
        print("\nkernels: gptoss_ext CPU kernels" + (" and CUDA kernels" if len(devices) > 1 else ""))
        model, prompts = model_demo(name, mcfg, devices[-1], mxfp4, steps)
        if mcfg.vocab_size >= 201088:  # gpt-oss's vocabulary: a Harmony chat turn through the tokenizer
            chat_demo(model)
        if devices[-1].type == "cuda":
            tokens = torch.tensor([prompts[0]])
            with torch.no_grad():
                gpu = model(tokens.cuda()).float().cpu()
                cpu = model.to("cpu")(tokens).float()
            err = ((gpu - cpu).norm() / cpu.norm()).item()
            print(f"   CUDA vs CPU logits, relative error {err:.2e} (bf16)")
        del model


if __name__ == "__main__":
    main()
