"""attention (prefill forward/backward) and attention_decode on the CPU: our kernels vs
(a) the eager oracle (gptoss_ext.reference.attention, which materialises the [B, Hq, T, T] logits:
    run only where they stay under --oracle-gb), and
(b) torch.nn.functional.scaled_dot_product_attention (enable_gqa=True) made to compute sink
    attention the way a user would. CPU SDPA returns no lse, so the sink becomes one extra key
    column: q gets an extra feature c_h = sink_h / sm_scale, every real key gets 0 there and one
    appended "sink key" gets 1 (all its other features 0) with a zero value row, so its logit is
    exactly sink_h per query head while k/v stay shared by the GQA group. The causal/window mask
    must then be an explicit boolean [T, T + 1] mask (the sink column always visible), which
    disables SDPA's causal block skipping. We also time plain causal SDPA without sinks
    (is_causal=True) as the speed of the library kernel itself; that row computes something
    else (no sinks) and is only a reference point.
Also: our backward vs our forward, and decode (B=8, 4096 cached tokens, one new token per
sequence): KV bytes read per second vs the copy bandwidth measured in the same run (common.py
counts a copy's read + write bytes).

Shapes come from the gpt-oss-20b config: Hq=64, Hkv=8, D=64, window 128. FLOPs count
4 * D per visible (query, key) pair per head for the forward (QK^T and PV) and 2.5x that for the
backward (five GEMMs instead of two)."""
import argparse

import torch
import torch.nn.functional as F

from gptoss import ModelConfig
from gptoss_ext import attention, attention_decode, reference
from common import commit, copy_bandwidth, machine, print_table, time_fn

attention_backward_op = torch.ops.gptoss_ext.attention_backward


def visible_pairs(t: int, window: int) -> int:
    return sum(min(i + 1, window) if window else i + 1 for i in range(t))


def sdpa_with_sinks(q, k, v, sinks, sm_scale, mask):
    """Sink attention through SDPA: the sink as an extra key column (see the module docstring).
    q [B, T, Hq, D], k/v [B, T, Hkv, D]; mask [T, T + 1] bool (True = attend)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qx = torch.cat((q, (sinks / sm_scale).to(q.dtype).view(1, 1, hq, 1).expand(b, t, hq, 1)), dim=-1)
    kx = torch.cat((k, k.new_zeros(b, t, hkv, 1)), dim=-1)
    sink_key = k.new_zeros(b, 1, hkv, d + 1)
    sink_key[..., d] = 1
    kx = torch.cat((kx, sink_key), dim=1)
    vx = torch.cat((v, v.new_zeros(b, 1, hkv, d)), dim=1)
    out = F.scaled_dot_product_attention(qx.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2),
                                         attn_mask=mask, scale=sm_scale, enable_gqa=True)
    return out.transpose(1, 2)


def sink_mask(t: int, window: int) -> torch.Tensor:
    i = torch.arange(t)
    keep = i[None, :] <= i[:, None]
    if window:
        keep &= i[None, :] > i[:, None] - window
    return torch.cat((keep, torch.ones(t, 1, dtype=torch.bool)), dim=1)


def check_baseline(cfg):
    """The SDPA composite computes sink attention (checked once, small, float32)."""
    q = torch.randn(1, 200, cfg.num_attention_heads, cfg.head_dim)
    k = torch.randn(1, 200, cfg.num_key_value_heads, cfg.head_dim)
    v = torch.randn_like(k)
    s = torch.randn(cfg.num_attention_heads)
    scale = cfg.head_dim ** -0.5
    for w in (0, cfg.sliding_window):
        want = reference.attention(q, k, v, s, scale, w)[0]
        got = sdpa_with_sinks(q, k, v, s, scale, sink_mask(200, w))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--oracle-gb", type=float, default=1.0,
                        help="run the eager oracle only while one float32 [B, Hq, T, T+1] logits tensor "
                             "stays under this many GB (it holds several such tensors at once)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.preset("gpt-oss-20b")
    hq, hkv, d, win = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    scale = d ** -0.5
    check_baseline(cfg)
    bw = copy_bandwidth()
    print(f"machine: {machine()}; commit {commit()}; copy bandwidth {bw / 1e9:.2f} GB/s (read + write)")

    def timed(fn, slow=False):  # slow baselines: three timed calls at most
        return time_fn(fn, min_time=args.min_time, warmup=1, max_iters=3 if slow else 1000)

    rows, notes = [], []
    for dtype in (torch.bfloat16, torch.float32):
        for t in args.lengths:
            q = torch.randn(1, t, hq, d).to(dtype)
            k = torch.randn(1, t, hkv, d).to(dtype)
            v = torch.randn(1, t, hkv, d).to(dtype)
            s = torch.randn(hq)
            for window in (0, win):
                label = [str(dtype).replace("torch.", ""), t, "causal" if window == 0 else f"window {window}"]
                flops = 4 * d * hq * visible_pairs(t, window)
                fwd = timed(lambda: attention(q, k, v, s, window=window), slow=t > 2048)
                out, lse = attention(q, k, v, s, window=window)
                g = torch.randn_like(out)
                bwd = timed(lambda: attention_backward_op(g, q, k, v, s, out, lse, scale, window, 0), slow=t > 2048)
                rows.append(label + ["ours forward", fwd * 1e3, flops / fwd / 1e12, 1.0])
                rows.append(label + ["ours backward", bwd * 1e3, 2.5 * flops / bwd / 1e12, bwd / fwd])
                mask = sink_mask(t, window)
                sd = timed(lambda: sdpa_with_sinks(q, k, v, s, scale, mask), slow=True)
                rows.append(label + ["SDPA + sink column, explicit mask", sd * 1e3, flops / sd / 1e12, sd / fwd])
                if window == 0:
                    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    sc = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                               slow=t > 2048)
                    rows.append(label + ["SDPA is_causal, no sinks (reference point)", sc * 1e3, flops / sc / 1e12,
                                         sc / fwd])
                if hq * t * (t + 1) * 4 / 1e9 <= args.oracle_gb:
                    ora = timed(lambda: reference.attention(q, k, v, s, scale, window), slow=True)
                    rows.append(label + ["eager oracle", ora * 1e3, flops / ora / 1e12, ora / fwd])
                elif (dtype, window) == (torch.bfloat16, 0):
                    notes.append(f"eager oracle skipped at T={t}: its float32 logits alone are "
                                 f"{hq * t * (t + 1) * 4 / 1e9:.1f} GB (limit --oracle-gb {args.oracle_gb})")
    print_table(f"attention prefill, B=1, Hq={hq}, Hkv={hkv}, D={d}",
                ["dtype", "T", "mask", "impl", "ms", "TFLOP/s", "time / ours fwd"], rows)
    for n in notes:
        print(f"- {n}")

    # Decode: 8 sequences, 4096 cached tokens each (the new token included), one query each.
    b, cache = 8, 4096
    drows = []
    for dtype in (torch.bfloat16, torch.float32):
        kc = torch.randn(b, cache, hkv, d).to(dtype)
        vc = torch.randn(b, cache, hkv, d).to(dtype)
        q = torch.randn(b, 1, hq, d).to(dtype)
        s = torch.randn(hq)
        lengths = torch.full((b,), cache - 1, dtype=torch.int32)
        nbytes = 2 * kc.numel() * kc.element_size()
        ours_full = None
        for window in (0, win):
            ours = timed(lambda: attention_decode(q, kc, vc, lengths, s, window=window))
            ours_full = ours_full or ours
            read = nbytes if window == 0 else nbytes * window / cache
            drows.append([str(dtype).replace("torch.", ""), "causal" if window == 0 else f"window {window}",
                          "ours", ours * 1e3, read / ours / 1e9, read / ours / bw, ours / ours_full])
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        sd = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        drows.append([str(dtype).replace("torch.", ""), "causal", "SDPA, no sinks (reference point)", sd * 1e3,
                      nbytes / sd / 1e9, nbytes / sd / bw, sd / ours_full])
    print_table(f"attention_decode, B={b}, {cache} cached tokens, Hq={hq}, Hkv={hkv}, D={d}, one new token",
                ["dtype", "mask", "impl", "ms", "KV GB/s", "of copy BW", "time / ours"], drows)


if __name__ == "__main__":
    main()
