"""MoE block on the CPU: our ops vs named baselines, measured side by side in one run.

1. Prefill (T=512 tokens, bf16 dense expert weights, gpt-oss-20b shapes): ops.moe_mlp vs
   - torch.matmul on the same per-expert GEMMs (the same expert row counts, weights streamed the same
     way; rate = expert-GEMM FLOPs / time), which is the GEMM rate ATen reaches on these shapes,
   - transformers' GptOssMLP (its "grouped_mm" and "eager" experts implementations) when
     transformers is installed, else skipped,
   - the pure-PyTorch oracle (gptoss_ext.reference.moe_mlp).
   Our rate is the expert-GEMM FLOPs over the whole block's time (routing, dispatch, SwiGLU and
   combine included).
2. Decode (T=1 and T=8, MXFP4 expert weights): effective weight bytes read per second (the MXFP4
   bytes of the experts the tokens select, blocks + scales) vs the copy bandwidth measured in the
   same run at the same thread count, and the time vs the same block with bf16 dense weights and
   vs the oracle. Run at 1 thread and at the default thread count: on an oversubscribed machine
   every parallel region waits for a descheduled thread (the table notes what one costs now),
   which dominates decode-sized work.

Routing uses a random router, so expert loads are uneven, as in a real prefill. The machine is
shared: every figure is the median of several runs, and rows that are compared were measured
interleaved.
"""
import argparse
import math

import torch

from gptoss import ModelConfig
from gptoss_ext import ops, reference
from common import commit, copy_bandwidth, machine, print_table, time_fn


def make_block(cfg, n_experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.intermediate_size

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

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
    mlp = GptOssMLP(hcfg).to(p["gate_weight"].dtype)
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


def expert_counts(x, p, k):
    logits = torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"])
    _, experts = ops.moe_route(logits, k)
    return torch.bincount(experts.flatten().long(), minlength=p["gate_weight"].shape[0]).tolist()


def prefill(cfg, tokens, k, reps):
    dtype = torch.bfloat16
    e, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    p = make_block(cfg, e, dtype)
    x = torch.randn(tokens, d).to(dtype)
    counts = expert_counts(x, p, k)
    flops = 2 * tokens * k * (d * 2 * inter + inter * d)
    xs = [torch.randn(c, d).to(dtype) for c in counts]
    as_ = [torch.randn(c, inter).to(dtype) for c in counts]

    def torch_mm():  # the same GEMMs, per expert, on ATen's bf16 matmul
        for i in range(e):
            if counts[i]:
                torch.matmul(xs[i], p["mlp1_weight"][i].t())
                torch.matmul(as_[i], p["mlp2_weight"][i].t())

    impls = {"gptoss_ext ops.moe_mlp": lambda: run_ours(x, p, k), "torch.matmul, same GEMMs": torch_mm}
    hf = hf_mlp(cfg, p, k)
    if hf is not None:
        mlp, hcfg = hf
        for impl in ("grouped_mm", "eager"):
            impls[f"transformers GptOssMLP ({impl})"] = (lambda impl=impl: (set_hf_impl(mlp, hcfg, impl), mlp(x[None])))
    impls["oracle reference.moe_mlp"] = lambda: run_oracle(x, p, k)
    times = {name: [] for name in impls}
    with torch.inference_mode():
        for _ in range(reps):  # interleaved, so that load changes hit every row alike
            for name, fn in impls.items():
                times[name].append(time_fn(fn, min_time=0.0, warmup=1, max_iters=3))
        # error vs the float32 oracle on the same (bf16) inputs, over the tokens whose experts agree
        # (bf16 router logits tie or swap near-equal experts for a few tokens; spec §6.2 #12)
        pf = {n: t.float() for n, t in p.items()}
        ours_ex = ops.moe_route(torch.nn.functional.linear(x, p["gate_weight"], p["gate_bias"]), k)[1]
        ref_ex = reference.moe_route(torch.nn.functional.linear(x.float(), pf["gate_weight"], pf["gate_bias"]), k)[1]
        same = (ours_ex.sort(-1).values == ref_ex.sort(-1).values).all(-1)
        diff = (run_ours(x, p, k).float() - run_oracle(x.float(), pf, k)).abs()[same]
        err = f"{diff.max().item():.3g} (rel. {(diff.max() / run_oracle(x.float(), pf, k).abs().max()).item():.2g}) " \
              f"over the {int(same.sum())}/{tokens} tokens routed alike"
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    ours = med["gptoss_ext ops.moe_mlp"]
    rows = [[name, f"{t * 1e3:.1f}", f"{flops / t / 1e9:.0f}", f"{t / ours:.2f}"] for name, t in med.items()]
    print_table(f"prefill T={tokens}, E={e}, k={k}, d=I={d}, bf16 weights; expert rows per expert min/median/max "
                f"{min(counts)}/{sorted(counts)[e // 2]}/{max(counts)}; max |ours - fp32 oracle| = {err}",
                ["impl", "ms", "expert-GEMM GFLOP/s", "time / ours"], rows)
    if hf is None:
        print("(transformers not installed: GptOssMLP baseline skipped)")


def region_cost(reps=50):
    """Seconds one small parallel ATen op takes now (an empty-ish parallel region: thread wake-up)."""
    a = torch.randn(1 << 17)
    return time_fn(lambda: a.add(1), min_time=0.05, warmup=2, max_iters=reps)


def decode(cfg, k, reps):
    e, d = cfg.num_experts, cfg.hidden_size
    p = make_block(cfg, e, torch.bfloat16)
    q1 = ops.mxfp4_quantize(p["mlp1_weight"])
    q2 = ops.mxfp4_quantize(p["mlp2_weight"])
    threads = torch.get_num_threads()
    rows, notes = [], []
    with torch.inference_mode():
        for nthr in sorted({1, threads}):
            torch.set_num_threads(nthr)
            bw = copy_bandwidth()
            notes.append(f"{nthr} thread(s): copy bandwidth {bw / 1e9:.1f} GB/s (read+write), one small parallel "
                         f"op {region_cost() * 1e3:.2f} ms")
            for tokens in (1, 8):
                x = torch.randn(tokens, d).to(torch.bfloat16)
                counts = expert_counts(x, p, k)
                used = sum(c > 0 for c in counts)
                wbytes = used * sum(t[0].nbytes + t[1].nbytes for t in (q1, q2)) / e
                dense_bytes = used * (p["mlp1_weight"].nbytes + p["mlp2_weight"].nbytes) / e
                impls = {"ours MXFP4": lambda: run_ours(x, p, k, q1, q2),
                         "ours bf16 dense": lambda: run_ours(x, p, k)}
                if nthr == threads:
                    impls["oracle MXFP4 (dequantize + matmul)"] = lambda: run_oracle(x, p, k, q1, q2)
                times = {name: [] for name in impls}
                for _ in range(reps):
                    for name, fn in impls.items():
                        times[name].append(time_fn(fn, min_time=0.05, warmup=1, max_iters=20))
                med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
                ours = med["ours MXFP4"]
                for name, t in med.items():
                    nb = dense_bytes if "dense" in name else wbytes
                    rows.append([nthr, tokens, used, name, f"{t * 1e3:.2f}", f"{nb / t / 1e9:.2f}", f"{nb / t / bw:.2f}",
                                 f"{t / ours:.2f}"])
    torch.set_num_threads(threads)
    print_table(f"decode, E={e}, k={k}, d=I={d}: bytes of the selected experts' weights over the block's time; "
                f"copy bandwidth measured at the same thread count just before",
                ["threads", "T", "experts", "impl", "ms", "weight GB/s", "of copy BW", "time / ours MXFP4"], rows)
    for n in notes:
        print(f"- {n}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=["prefill", "decode"], help="run one of the two tables")
    args = parser.parse_args()
    cfg = ModelConfig.preset(args.preset)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"machine: {machine()}; commit {commit()}; copy bandwidth {bw / 1e9:.1f} GB/s")
    if args.only != "decode":
        prefill(cfg, args.tokens, cfg.experts_per_token, args.reps)
    if args.only != "prefill":
        decode(cfg, cfg.experts_per_token, args.reps)
    print(f"copy bandwidth after the run: {copy_bandwidth() / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
