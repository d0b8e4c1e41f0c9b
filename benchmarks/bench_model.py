"""The whole model: prefill and decode throughput, side by side with named baselines in one run,
with the peak memory of each measurement.

Default (CPU): gpt-oss-20b shapes cut to 2 layers, MXFP4 experts, batch 1, random seeded weights
written once as a checkpoint (OpenAI layout, MXFP4) plus the same weights dequantized to bf16 in
the Hugging Face layout. Each side then runs in its own process (so its peak RSS is its own):
  - ours: Transformer.from_checkpoint (MXFP4 experts kept), prefill via forward(last_only=True),
    decode via Transformer.decode_step;
  - transformers GptOssForCausalLM.from_pretrained (bf16, eager attention; experts both "grouped_mm"
    and "eager"), prefill with logits_to_keep=1 and decode over its DynamicCache.
  Figures: prefill tokens/s at --prefill tokens, decode tokens/s at --context cached tokens, and
  the fraction of the memory-bandwidth floor (bytes one decode token reads over the copy bandwidth
  measured in the same run). Both sides also print their logits for the same prompt; the parent
  checks they agree (same weights).
--full: gpt-oss-20b at full size with random MXFP4 weights (~13 GB): written once to --ckpt-dir
  (reused when present; drawn tensor by tensor, a few GB of RAM), loaded with from_checkpoint and
  decoded; tokens/s vs the bandwidth floor, and peak RSS.
--device cuda: gpt-oss-20b (full size, random MXFP4 weights built on the GPU) decode at batch 1,
  eager decode_step and the CUDA-graph decoder, vs the bandwidth floor; peak GPU memory.

Peak memory: VmHWM of the worker process (CPU), torch.cuda.max_memory_allocated (GPU).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import commit, copy_bandwidth, machine, print_table
from gptoss.analysis import decode_bytes_per_token

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------- helpers

def peak_rss() -> int:
    """This process's resident-set high-water mark (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def run_worker(args_list, timeout=3600):
    """Run this script as a worker process; returns its JSON result (last stdout line)."""
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"worker {args_list[:2]} failed (rc {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ----------------------------------------------------------------------------------- workers

class _RandomState(dict):
    """A state dict (our names, MXFP4 experts) whose tensors are drawn when looked up, seeded by
    name, so that save_checkpoint writes a full-size random checkpoint holding one shard at a time
    in memory. Iterating items()/values() gives meta tensors (shapes and dtypes for the checks).
    Values as Transformer.init_weights draws them."""

    def __init__(self, cfg):
        from gptoss import expected_shapes
        super().__init__({name: torch.empty(shape, dtype=torch.bfloat16 if kind == "float" else torch.uint8,
                                            device="meta")
                          for name, (shape, kind) in expected_shapes(cfg, mxfp4=True).items()})

    def __getitem__(self, name):
        import zlib
        meta = super().__getitem__(name)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.scale"):
            return torch.ones(meta.shape, dtype=meta.dtype)
        if name.endswith("sinks"):
            return torch.randn(meta.shape, generator=g).to(meta.dtype)
        if name.endswith("bias"):
            return torch.zeros(meta.shape, dtype=meta.dtype)
        if name.endswith(".blocks"):
            return torch.randint(0, 256, meta.shape, generator=g, dtype=torch.uint8)
        if name.endswith(".scales"):
            return torch.full(meta.shape, 127 - 7, dtype=torch.uint8)
        return torch.empty(meta.shape, dtype=meta.dtype).normal_(0.0, 0.02, generator=g)


def worker_make(a):
    """Write a random MXFP4 model (OpenAI layout, 2 GiB shards): --layers N > 0 builds
    Transformer.from_config (seeded) cut to N layers, and with --hf-dir also writes the same weights
    dequantized to bf16 in the HF layout; --layers 0 writes the full-size model drawn tensor by
    tensor (_RandomState), never holding it whole."""
    from gptoss import ModelConfig, Transformer, load_state_dict, save_checkpoint
    t0 = time.perf_counter()
    if a.layers:
        cfg = ModelConfig.preset("gpt-oss-20b", num_hidden_layers=a.layers)
        model = Transformer.from_config(cfg, seed=0, mxfp4=True, dtype=torch.bfloat16)
        build_s = time.perf_counter() - t0
        model.save_checkpoint(a.ckpt, max_shard_bytes=2 * 2**30, progress=False)
        del model
    else:
        cfg = ModelConfig.preset("gpt-oss-20b")
        build_s = 0.0
        save_checkpoint(_RandomState(cfg), cfg, a.ckpt, max_shard_bytes=2 * 2**30, progress=False)
    if a.hf_dir:
        _, state = load_state_dict(a.ckpt, dtype=torch.bfloat16, mxfp4="dequantize", progress=False)
        save_checkpoint(state, cfg, a.hf_dir, layout="hf", progress=False)
        del state
    return dict(build_s=build_s, save_s=time.perf_counter() - t0 - build_s, peak_rss=peak_rss())


def _prompt(vocab, n, seed):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def worker_ours(a):
    from gptoss import Transformer
    t0 = time.perf_counter()
    model = Transformer.from_checkpoint(a.ckpt, progress=False)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss()
    cfg = model.cfg
    res = dict(load_s=load_s, rss_after_load=rss_loaded)
    with torch.inference_mode():
        check = _prompt(cfg.vocab_size, 16, 1)
        torch.save(model(check).float(), os.path.join(a.tmp, "logits_ours.pt"))
        if a.prefill:
            tokens = _prompt(cfg.vocab_size, a.prefill, 2)

            def prefill():
                caches = model.new_caches(1, a.prefill, max_step=a.prefill)
                return model(tokens, caches, last_only=True)

            prefill()
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                prefill()
                times.append(time.perf_counter() - t)
            res["prefill_s"] = median(times)
        ctx = _prompt(cfg.vocab_size, a.context, 3)
        caches = model.new_caches(1, a.context + a.steps + 2, max_step=a.context)
        logits = model(ctx, caches, last_only=True)
        times = []
        for _ in range(a.steps + 2):
            tok = logits.argmax(-1).view(1, 1)
            t = time.perf_counter()
            logits = model.decode_step(tok, caches)[:, 0]
            times.append(time.perf_counter() - t)
        res["decode_s"] = median(times[2:])
    res["peak_rss"] = peak_rss()
    return res


def worker_hf(a):
    import transformers
    t0 = time.perf_counter()
    model = transformers.GptOssForCausalLM.from_pretrained(a.ckpt, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    default_impl = model.config._experts_implementation
    res = dict(load_s=load_s, rss_after_load=peak_rss(), transformers=transformers.__version__,
               default_experts=str(default_impl), impls={})
    impls = [str(default_impl)] + [i for i in ("grouped_mm", "eager") if i != default_impl]

    def set_impl(impl):
        model.config._experts_implementation = impl
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_experts_implementation"):
                m.config._experts_implementation = impl

    with torch.inference_mode():
        check = _prompt(model.config.vocab_size, 16, 1)
        torch.save(model(check).logits.float(), os.path.join(a.tmp, "logits_hf.pt"))
        for impl in impls:
            set_impl(impl)
            r = {}
            if a.prefill:
                tokens = _prompt(model.config.vocab_size, a.prefill, 2)
                model(tokens, use_cache=True, logits_to_keep=1)
                times = []
                for _ in range(a.reps):
                    t = time.perf_counter()
                    model(tokens, use_cache=True, logits_to_keep=1)
                    times.append(time.perf_counter() - t)
                r["prefill_s"] = median(times)
            ctx = _prompt(model.config.vocab_size, a.context, 3)
            out = model(ctx, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1]
            times = []
            for _ in range(a.steps + 2):
                tok = logits.argmax(-1).view(1, 1)
                t = time.perf_counter()
                out = model(tok, past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
                times.append(time.perf_counter() - t)
            r["decode_s"] = median(times[2:])
            res["impls"][impl] = r
    res["peak_rss"] = peak_rss()
    return res


WORKERS = {"make": worker_make, "ours": worker_ours, "hf": worker_hf}


# ------------------------------------------------------------------------------------ drivers

def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_compare(a):
    from gptoss import ModelConfig
    cfg = ModelConfig.preset("gpt-oss-20b", num_hidden_layers=a.layers)
    tmp = tempfile.mkdtemp(prefix="bench_model_", dir=a.tmp_root)
    ours_dir, hf_dir = os.path.join(tmp, "ours"), os.path.join(tmp, "hf")
    print(f"machine: {machine()}; commit {commit()}; load average {load_avg()}")
    made = run_worker(["--worker", "make", "--ckpt", ours_dir, "--hf-dir", hf_dir, "--layers", str(a.layers),
                       "--tmp", tmp])
    print(f"checkpoints in {tmp}: built in {made['build_s']:.1f} s, written in {made['save_s']:.1f} s "
          f"(peak RSS {gib(made['peak_rss'])} GiB)")
    floor_ours = decode_bytes_per_token(cfg, a.context, "mxfp4")
    floor_hf = decode_bytes_per_token(cfg, a.context, "dense")
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        common_args = ["--tmp", tmp, "--context", str(a.context), "--prefill", str(a.prefill), "--steps",
                       str(a.steps), "--reps", str(a.reps), "--threads", str(threads)]
        # --rounds alternates the two sides (ours, transformers, ours, ...) and keeps each figure's
        # median over the rounds, so that load changes on a shared machine hit both sides alike
        bws, ours_runs, hf_runs = [], [], []
        for r in range(a.rounds):
            bws.append(copy_bandwidth())
            ours_runs.append(run_worker(["--worker", "ours", "--ckpt", ours_dir] + common_args))
            print(f"{threads} thread(s), round {r + 1}: ours done (load average {load_avg()})")
            hf_runs.append(run_worker(["--worker", "hf", "--ckpt", hf_dir] + common_args))
            print(f"{threads} thread(s), round {r + 1}: transformers done (load average {load_avg()})")
        bws.append(copy_bandwidth())
        bw = median(bws)
        ours = {key: median([o[key] for o in ours_runs]) for key in ("prefill_s", "decode_s", "load_s")}
        ours["peak_rss"] = max(o["peak_rss"] for o in ours_runs)
        hf = dict(hf_runs[0], load_s=median([h["load_s"] for h in hf_runs]),
                  peak_rss=max(h["peak_rss"] for h in hf_runs),
                  impls={impl: {key: median([h["impls"][impl][key] for h in hf_runs]) for key in ("prefill_s", "decode_s")}
                         for impl in hf_runs[0]["impls"]})
        rows.append([threads, f"{bw / 1e9:.1f}", "ours (gptoss_ext, MXFP4 experts)", f"{a.prefill / ours['prefill_s']:.1f}",
                     f"{1 / ours['decode_s']:.2f}", f"{floor_ours / 1e9:.2f}", f"{floor_ours / ours['decode_s'] / bw:.2f}",
                     "1.00", "1.00", f"{ours['load_s']:.1f}", gib(ours["peak_rss"])])
        for impl, r in hf["impls"].items():
            rows.append([threads, f"{bw / 1e9:.1f}", f"transformers {hf['transformers']} bf16 ({impl} experts)",
                         f"{a.prefill / r['prefill_s']:.1f}", f"{1 / r['decode_s']:.2f}", f"{floor_hf / 1e9:.2f}",
                         f"{floor_hf / r['decode_s'] / bw:.2f}", f"{r['prefill_s'] / ours['prefill_s']:.2f}",
                         f"{r['decode_s'] / ours['decode_s']:.2f}", f"{hf['load_s']:.1f}", gib(hf["peak_rss"])])
    lo, lh = torch.load(os.path.join(tmp, "logits_ours.pt")), torch.load(os.path.join(tmp, "logits_hf.pt"))
    agree = ((lo - lh).norm() / lh.norm()).item()
    top1 = (lo.argmax(-1) == lh.argmax(-1)).float().mean().item()
    print_table(f"gpt-oss-20b cut to {a.layers} layers, CPU, batch 1: prefill of {a.prefill} tokens, decode after "
                f"{a.context} cached tokens; medians over {a.rounds} alternating round(s); copy bandwidth (read+write, "
                f"at the same thread count, median of the measurements between the runs) is the floor's denominator",
                ["threads", "copy GB/s", "impl", "prefill tok/s", "decode tok/s", "GB read / token", "of BW floor",
                 "ours prefill speed-up", "ours decode speed-up", "load s", "peak RSS GiB"], rows)
    print(f"- same weights: logits on a 16-token prompt, ours vs transformers: rel. error {agree:.2e}, "
          f"top-1 agreement {top1:.2f} (bf16)")
    print(f"- load average at the end: {load_avg()}")
    if not a.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_full(a):
    from gptoss import ModelConfig
    cfg = ModelConfig.preset("gpt-oss-20b")
    ckpt = a.ckpt_dir or os.path.join(a.tmp_root or tempfile.gettempdir(), "gptoss-20b-random-mxfp4")
    print(f"machine: {machine()}; commit {commit()}; load average {load_avg()}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        made = run_worker(["--worker", "make", "--ckpt", ckpt, "--layers", "0", "--tmp", ckpt])
        print(f"wrote {ckpt}: built in {made['build_s']:.1f} s, written in {made['save_s']:.1f} s "
              f"(peak RSS {gib(made['peak_rss'])} GiB)")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    floor = decode_bytes_per_token(cfg, a.context, "mxfp4")
    tmp = tempfile.mkdtemp(prefix="bench_model_", dir=a.tmp_root)
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        bw0 = copy_bandwidth()
        ours = run_worker(["--worker", "ours", "--ckpt", ckpt, "--tmp", tmp, "--context", str(a.context),
                           "--prefill", "0", "--steps", str(a.steps), "--reps", "1", "--threads", str(threads)])
        bw = (bw0 + copy_bandwidth()) / 2
        rows.append([threads, f"{bw / 1e9:.1f}", f"{ours['load_s']:.1f}", f"{1 / ours['decode_s']:.3f}",
                     f"{floor / 1e9:.2f}", f"{bw / floor:.3f}", f"{floor / ours['decode_s'] / bw:.2f}",
                     gib(ours["rss_after_load"]), gib(ours["peak_rss"])])
        print(f"{threads} thread(s) done (load average {load_avg()})")
    print_table(f"gpt-oss-20b full size, random MXFP4 weights ({size / 1e9:.1f} GB checkpoint, memory-mapped), CPU, "
                f"batch 1, decode after {a.context} cached tokens",
                ["threads", "copy GB/s", "load s", "decode tok/s", "GB read / token", "floor tok/s", "of BW floor",
                 "RSS after load GiB", "peak RSS GiB"], rows)
    print(f"- load average at the end: {load_avg()}")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def gpu(a):
    from gptoss import CUDAGraphDecoder, ModelConfig, Transformer
    from common import time_fn
    cfg = ModelConfig.preset("gpt-oss-20b")
    dev = torch.device("cuda")
    print(f"machine: {machine()}; commit {commit()}")
    t0 = time.perf_counter()
    model = Transformer(cfg, mxfp4=True, dtype=torch.bfloat16, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():  # random weights drawn on the GPU (from_config draws on the host: slow at this size)
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if name.endswith("sinks") else 0.02, generator=g)
        for blk in model.block:
            for w in (blk.mlp.mlp1_weight, blk.mlp.mlp2_weight):
                w.blocks.random_(0, 256, generator=g)
                w.scales.fill_(127 - 7)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    bw = copy_bandwidth(dev, 1 << 30)
    rows = []
    with torch.inference_mode():
        ctx = torch.randint(0, cfg.vocab_size, (1, a.context), device=dev, generator=g)
        for rnd in range(a.rounds):
            for mode in ("eager", "cuda graph"):
                try:  # a mode that fails is a row, not the end of the run
                    torch.cuda.reset_peak_memory_stats()
                    caches = model.new_caches(1, a.context + a.steps + 64, max_step=a.context)
                    logits = model(ctx, caches, last_only=True)
                    tok = logits.argmax(-1).view(1, 1)
                    step = (CUDAGraphDecoder(model, caches) if mode == "cuda graph"
                            else (lambda t: model.decode_step(t, caches)))
                    # greedy: each step's argmax is the next step's token (on the device, no host sync)
                    t = time_fn(lambda: tok.copy_(step(tok)[:, -1].argmax(-1, keepdim=True)), dev,
                                min_time=1.0, warmup=3, max_iters=a.steps)
                except Exception as e:
                    rows.append([rnd, mode, f"failed: {e!r}"[:80]] + [""] * 5)
                    print("row:", " | ".join(map(str, rows[-1])), flush=True)
                    continue
                floor = decode_bytes_per_token(cfg, a.context, "mxfp4")
                rows.append([rnd, mode, f"{1 / t:.0f}", f"{t * 1e3:.3f}", f"{floor / 1e9:.2f}", f"{bw / floor:.0f}",
                             f"{floor / t / bw:.2f}", gib(torch.cuda.max_memory_allocated())])
                print("row:", " | ".join(map(str, rows[-1])), flush=True)  # survives a timeout
                del step, caches
    print_table(f"gpt-oss-20b, random MXFP4 weights, {torch.cuda.get_device_name()}, batch 1, decode after {a.context} "
                f"cached tokens (greedy, the token fed back on the device); copy bandwidth {bw / 1e9:.0f} GB/s; built in "
                f"{build_s:.1f} s",
                ["round", "decode", "tok/s", "ms / token", "GB read / token", "floor tok/s",
                 "of BW floor", "peak GPU mem GiB"], rows)
    with torch.inference_mode():
        try:
            gpu_kernel_profile(model, ctx, a)
        except Exception as e:  # the profile is a diagnostic: never lose the table above to it
            print(f"kernel profile failed: {e!r}")


def gpu_kernel_profile(model, ctx, a, steps=10):
    """Where a decode step's GPU time goes: the kernels of `steps` eager decode steps (torch.profiler),
    summed by kernel name, per step. Kernel time only: the gaps between kernels are the difference
    to the CUDA-graph step time above."""
    from torch.profiler import ProfilerActivity, profile
    caches = model.new_caches(1, a.context + steps + 64, max_step=a.context)
    tok = model(ctx, caches, last_only=True).argmax(-1).view(1, 1)
    model.decode_step(tok, caches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = model.decode_step(tok, caches)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    by_name = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            t, n = by_name.get(ev.name, (0.0, 0))
            by_name[ev.name] = (t + ev.device_time, n + 1)
    total = sum(t for t, _ in by_name.values()) / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]
    rows = [[name[:90], f"{t / steps:.1f}", f"{n / steps:.0f}", f"{t / steps / total:.2f}"] for name, (t, n) in top]
    print_table(f"decode step kernels (eager, {steps} steps profiled): {total:.0f} us of kernel time per token, "
                f"{sum(n for _, n in by_name.values()) / steps:.0f} kernels per token",
                ["kernel", "us / token", "launches / token", "share"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--full", action="store_true", help="CPU: full-size gpt-oss-20b (writes a ~13 GB checkpoint)")
    p.add_argument("--ckpt-dir", help="--full: where the random 20b checkpoint is (written there if absent)")
    p.add_argument("--tmp-root", help="folder for the temporary checkpoints (default: the system's)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=None, help="cached tokens before the timed decode steps "
                   "(default 1024; --full 128)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 16 CPU, 200 GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoints")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the sides compared (CPU: medians "
                   "reported; use 3 on a shared machine)")
    p.add_argument("--threads", default=None, help="CPU: comma-separated thread counts, one run of each side per "
                   "count (default: torch's default count)")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS))
    p.add_argument("--ckpt")
    p.add_argument("--hf-dir")
    p.add_argument("--tmp")
    a = p.parse_args()
    if a.worker:
        if a.threads:
            torch.set_num_threads(int(a.threads))
        print(json.dumps(WORKERS[a.worker](a)))
        return
    a.threads = [int(n) for n in a.threads.split(",")] if a.threads else [torch.get_num_threads()]
    if a.context is None:
        a.context = 128 if a.full else 1024
    if a.steps is None:
        a.steps = 200 if a.device == "cuda" else (8 if a.full else 16)
    if a.device == "cuda":
        gpu(a)
    elif a.full:
        cpu_full(a)
    else:
        cpu_compare(a)


if __name__ == "__main__":
    main()
