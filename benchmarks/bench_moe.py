"""MoE block: our ops vs named baselines, measured side by side in one run, on the CPU or on a
GPU (`--device`, default cuda when this build has CUDA kernels and a GPU is visible; one code
path for both).

1. Prefill (T tokens, bf16 dense expert weights, gpt-oss-20b shapes; T=512 on the CPU, 4096 on a
   GPU): ops.moe_mlp vs
   - torch.matmul on the same per-expert GEMMs (the same expert row counts; rate = expert-GEMM
     FLOPs / time), the GEMM rate ATen reaches on these shapes,
   - torch.matmul dense, the same FLOPs as one [T*k, d] x [d, 2I] and one [T*k, I] x [I, d] GEMM
     (cuBLAS on a GPU): the dense bf16 rate,
   - transformers' GptOssMLP (its "grouped_mm" and "eager" experts implementations) when
     transformers is installed, else skipped,
   - the pure-PyTorch oracle (gptoss_ext.reference.moe_mlp).
   Our rate is the expert-GEMM FLOPs over the whole block's time (routing, dispatch, SwiGLU and
   combine included).
2. Decode (T=1 and T=8, MXFP4 expert weights): effective weight bytes read per second (MXFP4
   blocks + scales of the experts the tokens select, plus their biases) vs the copy bandwidth
   measured interleaved with it in the same loop (same thread count), and the time vs the same
   block with bf16 dense weights and vs transformers' GptOssMLP with bf16 weights. Each timed call
   takes the next of 16 inputs, which together select nearly all experts (about 380 MB of MXFP4
   at T=1, more than a 300 MB L3), so that the weights are not re-read from cache (the selected
   experts' bytes of one input are counted). On the CPU it runs at 1 thread and at the default
   thread count.

Routing uses a random router, so expert loads are uneven, as in a real prefill. Every figure is
the median of several runs, interleaved so that load changes hit every row alike.
"""
import argparse

import torch

import gptoss_ext
from gptoss import ModelConfig
from gptoss_ext import ops, reference
from common import commit, copy_bandwidth, machine, print_table, sync, time_fn


def make_block(cfg, n_experts, dtype, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.intermediate_size

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return dict(gate_weight=rnd(n_experts, d, scale=d ** -0.5), gate_bias=rnd(n_experts, scale=0.1),
                mlp1_weight=rnd(n_experts, 2 * inter, d, scale=d ** -0.5), mlp1_bias=rnd(n_experts, 2 * inter, scale=0.1),
                mlp2_weight=rnd(n_experts, d, inter, scale=inter ** -0.5), mlp2_bias=rnd(n_experts, d, scale=0.1))


def run_ours(x, p, k, w1=None, w2=None):
    return ops.moe_mlp(x, p["gate_weight"], p["gate_bias"], p["mlp1_weight"] if w1 is None else w1, p["mlp1_bias"],
                       p["mlp2_weight"] if w2 is None else w2, p["mlp2_bias"], k=k)


def run_oracle(x, p, k, w1=None, w2=None):
    return reference.moe_mlp(x, p["gate_weight"], p["gate_bias"], p["mlp1_weight"] if w1 is None else w1,
                             p["mlp1_bias"], p["mlp2_weight"] if w2 is None else w2, p["mlp2_bias"], k=k)


def hf_mlp(cfg, p, k):
    """transformers' GptOssMLP holding the same weights (HF layout: [E, in, out]), or None."""
    try:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    except ImportError:
        return None
    e = p["gate_weight"].shape[0]
    hcfg = GptOssConfig(num_local_experts=e, num_experts_per_tok=k, hidden_size=cfg.hidden_size,
                        intermediate_size=cfg.intermediate_size)
    with torch.device("meta"):  # no throw-away random init of the full-size weights
        mlp = GptOssMLP(hcfg)
    mlp = mlp.to_empty(device=p["gate_weight"].device).to(p["gate_weight"].dtype)
    with torch.no_grad():
        mlp.router.weight.copy_(p["gate_weight"])
        mlp.router.bias.copy_(p["gate_bias"])
        mlp.experts.gate_up_proj.copy_(p["mlp1_weight"].transpose(1, 2))
        mlp.experts.gate_up_proj_bias.copy_(p["mlp1_bias"])
        mlp.experts.down_proj.copy_(p["mlp2_weight"].transpose(1, 2))
        mlp.experts.down_proj_bias.copy_(p["mlp2_bias"])
    return mlp, hcfg


def set_hf_impl(mlp, hcfg, impl):
    hcfg._experts_implementation = impl
    mlp.experts.config = hcfg


def hf_impls(cfg, p, k, x_of):
    """{name: fn} for transformers' GptOssMLP (grouped_mm and eager experts); x_of() gives the input."""
    hf = hf_mlp(cfg, p, k)
    if hf is None:
        print("(transformers not installed: GptOssMLP baseline skipped)")
        return {}
    mlp, hcfg = hf
    return {f"transformers GptOssMLP bf16 ({impl})":
            (lambda impl=impl: (set_hf_impl(mlp, hcfg, impl), mlp(x_of()[None]))) for impl in ("grouped_mm", "eager")}


def expert_counts(x, p, k):
    logits = torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"])
    _, experts = ops.moe_route(logits, k)
    return torch.bincount(experts.flatten().long(), minlength=p["gate_weight"].shape[0]).tolist()


def interleaved(impls, reps, device, **kw):
    """Median seconds per impl, the impls timed in turn `reps` times (load changes hit all alike)."""
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            times[name].append(time_fn(fn, device, **kw))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def prefill(cfg, tokens, k, reps, device):
    dtype = torch.bfloat16
    e, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    p = make_block(cfg, e, dtype, device=device)
    x = torch.randn(tokens, d, device=device).to(dtype)
    counts = expert_counts(x, p, k)
    flops = 2 * tokens * k * (d * 2 * inter + inter * d)
    xs = [torch.randn(c, d, device=device).to(dtype) for c in counts]
    as_ = [torch.randn(c, inter, device=device).to(dtype) for c in counts]
    xd = torch.randn(tokens * k, d, device=device).to(dtype)
    ad = torch.randn(tokens * k, inter, device=device).to(dtype)
    w1d, w2d = p["mlp1_weight"][0].t().contiguous(), p["mlp2_weight"][0].t().contiguous()

    def torch_mm():  # the same GEMMs, per expert, on ATen's bf16 matmul
        for i in range(e):
            if counts[i]:
                torch.matmul(xs[i], p["mlp1_weight"][i].t())
                torch.matmul(as_[i], p["mlp2_weight"][i].t())

    def dense_mm():  # the same FLOPs as two dense GEMMs (cuBLAS on a GPU)
        torch.matmul(xd, w1d)
        torch.matmul(ad, w2d)

    impls = {"gptoss_ext ops.moe_mlp": lambda: run_ours(x, p, k), "torch.matmul, same GEMMs": torch_mm,
             "torch.matmul dense, same FLOPs": dense_mm}
    impls.update(hf_impls(cfg, p, k, lambda: x))
    impls["oracle reference.moe_mlp"] = lambda: run_oracle(x, p, k)
    with torch.inference_mode():
        med = interleaved(impls, reps, device, min_time=0.0 if device == "cpu" else 0.1, warmup=1,
                          max_iters=3 if device == "cpu" else 50)
        # error vs the float32 oracle on the same (bf16) inputs, over the tokens whose experts agree
        # (bf16 router logits tie or swap near-equal experts for a few tokens; spec §6.2 #12)
        pf = {n: t.float() for n, t in p.items()}
        ours_ex = ops.moe_route(torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"]), k)[1]
        ref_ex = reference.moe_route(torch.nn.functional.linear(x.float(), pf["gate_weight"], pf["gate_bias"]), k)[1]
        same = (ours_ex.sort(-1).values == ref_ex.sort(-1).values).all(-1)
        ref = run_oracle(x.float(), pf, k)
        diff = (run_ours(x, p, k).float() - ref).abs()[same]
        err = f"{diff.max().item():.3g} (rel. {(diff.max() / ref.abs().max()).item():.2g}) " \
              f"over the {int(same.sum())}/{tokens} tokens routed alike"
    ours = med["gptoss_ext ops.moe_mlp"]
    rows = [[name, f"{t * 1e3:.2f}", f"{flops / t / 1e9:.0f}", f"{t / ours:.2f}"] for name, t in med.items()]
    print_table(f"prefill T={tokens}, E={e}, k={k}, d=I={d}, bf16 weights; expert rows per expert min/median/max "
                f"{min(counts)}/{sorted(counts)[e // 2]}/{max(counts)}; max |ours - fp32 oracle| = {err}",
                ["impl", "ms", "expert-GEMM GFLOP/s", "time / ours"], rows)
    dense = med["torch.matmul dense, same FLOPs"]
    print(f"- ours at {dense / ours:.2f} of the dense bf16 matmul rate (same FLOPs), "
          f"{med['torch.matmul, same GEMMs'] / ours:.2f} of the per-expert matmul rate")


def region_cost(reps=50):
    """Seconds one small parallel ATen op takes now (an empty-ish parallel region: thread wake-up)."""
    a = torch.randn(1 << 17)
    return time_fn(lambda: a.add(1), min_time=0.05, warmup=2, max_iters=reps)


class Cycle:
    """Calls fn(inputs[i]) with i advancing on every call."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(self.inputs[self.i])


def decode(cfg, k, reps, device, n_inputs=16):
    e, d = cfg.num_experts, cfg.hidden_size
    p = make_block(cfg, e, torch.bfloat16, device=device)
    q1 = ops.mxfp4_quantize(p["mlp1_weight"])
    q2 = ops.mxfp4_quantize(p["mlp2_weight"])
    mx_bytes = sum(t[0].nbytes + t[1].nbytes for t in (q1, q2)) / e  # one expert's blocks + scales
    dense_bytes = (p["mlp1_weight"].nbytes + p["mlp2_weight"].nbytes) / e
    bias_bytes = (p["mlp1_bias"].nbytes + p["mlp2_bias"].nbytes) / e
    nbytes = 256 << 20 if device == "cpu" else 1 << 30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads}) if device == "cpu" else [default_threads]
    rows, notes = [], []
    with torch.inference_mode():
        for nthr in thread_counts:
            torch.set_num_threads(nthr)
            if device == "cpu":
                notes.append(f"{nthr} thread(s): one small parallel op {region_cost() * 1e3:.3f} ms")
            for tokens in (1, 8):
                xs = [torch.randn(tokens, d, device=device).to(torch.bfloat16) for _ in range(n_inputs)]
                used = sum(sum(c > 0 for c in expert_counts(x, p, k)) for x in xs) / n_inputs
                wbytes, dbytes = used * (mx_bytes + bias_bytes), used * (dense_bytes + bias_bytes)
                impls = {"copy (read + write bytes)": lambda: dst.copy_(src),
                         "ours MXFP4": Cycle(lambda x: run_ours(x, p, k, q1, q2), xs),
                         "ours bf16 dense": Cycle(lambda x: run_ours(x, p, k), xs)}
                if nthr == default_threads and tokens == 8:
                    cur = Cycle(lambda x: x, xs)
                    impls.update(hf_impls(cfg, p, k, cur))
                med = interleaved(impls, reps, device, min_time=0.05, warmup=2,
                                  max_iters=20 if device == "cpu" else 200)
                bw = 2 * nbytes / med.pop("copy (read + write bytes)")
                ours = med["ours MXFP4"]
                for name, t in med.items():
                    nb = wbytes if "MXFP4" in name else dbytes
                    rows.append([nthr, tokens, f"{used:.1f}", name, f"{t * 1e3:.3f}", f"{nb / t / 1e9:.2f}",
                                 f"{nb / t / bw:.2f}", f"{t / ours:.2f}"])
                notes.append(f"{nthr} thread(s), T={tokens}: copy bandwidth {bw / 1e9:.1f} GB/s (read + write), "
                             "measured interleaved with these rows")
    torch.set_num_threads(default_threads)
    print_table(f"decode, E={e}, k={k}, d=I={d}: bytes of the selected experts' weights (and biases) over the "
                f"block's time; {n_inputs} inputs in turn", ["threads", "T", "experts", "impl", "ms", "weight GB/s",
                                                           "of copy BW", "time / ours MXFP4"], rows)
    for n in notes:
        print(f"- {n}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--device",
                        default="cuda" if torch.cuda.is_available() and gptoss_ext.has_cuda_kernels() else "cpu")
    parser.add_argument("--tokens", type=int, help="prefill tokens (default 512 on the CPU, 4096 on a GPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=["prefill", "decode"], help="run one of the two tables")
    args = parser.parse_args()
    cfg = ModelConfig.preset(args.preset)
    device = torch.device(args.device).type
    tokens = args.tokens or (512 if device == "cpu" else 4096)
    torch.manual_seed(0)
    print(f"machine: {machine()}; device {device}; commit {commit()}; "
          f"copy bandwidth {copy_bandwidth(device) / 1e9:.1f} GB/s")
    if args.only != "decode":
        prefill(cfg, tokens, cfg.experts_per_token, args.reps, device)
    if args.only != "prefill":
        decode(cfg, cfg.experts_per_token, args.reps, device)
    sync(device)
    print(f"copy bandwidth after the run: {copy_bandwidth(device) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
