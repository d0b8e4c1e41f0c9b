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
backward (five GEMMs instead of two); a causal T x T problem has T * (T + 1) / 2 visible pairs
(about the usual 4 * T * T / 2 * D * Hq causal count).

--device cuda (the default when a GPU and our CUDA kernels are present): bfloat16, B=1, prefill
causal forward at T in {1024, 4096, 8192} in TFLOP/s vs torch SDPA with the flash backend
(is_causal, enable_gqa, no sinks: the library's fastest kernel, computing less than ours), window
128 rows (ours only: SDPA's flash path has no window), backward vs SDPA flash backward; decode
(B=8 and B=1, caches of 4096 and 32768 tokens, and a window-128 ring cache): KV bytes read per
second as a fraction of the device copy bandwidth measured in the same run. Decode calls rotate
over enough cache copies that the data read exceeds the GPU's L2 (HBM, not L2, is measured).
Targets (issue 3): prefill >= 300 TFLOP/s at T=8192, decode >= 70% of the copy bandwidth.
--smoke runs either suite at tiny sizes (a logic check of the script, e.g. the CUDA suite's code
on the CPU)."""
import argparse
import contextlib

import torch
import torch.nn.functional as F

from gptoss import ModelConfig
import gptoss_ext
from gptoss_ext import attention, attention_decode, kv_cache_append, reference
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


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def decode_case(b, cache, hq, hkv, d, dtype, device, window=0, copies=1):
    """`copies` independent decode problems (q, k_cache, v_cache, lengths) of B sequences whose
    caches hold `cache` tokens (the new one included); window > 0 makes a ring cache of `window`
    slots filled through kv_cache_append. Returns (problems, KV bytes one call reads)."""
    probs = []
    for _ in range(copies):
        q = torch.randn(b, 1, hq, d, device=device).to(dtype)
        lengths = torch.full((b,), cache - 1, dtype=torch.int32, device=device)
        if window:
            kc = torch.empty(b, window, hkv, d, device=device, dtype=dtype)
            vc = torch.empty_like(kc)
            k = torch.randn(b, window, hkv, d, device=device).to(dtype)
            v = torch.randn(b, window, hkv, d, device=device).to(dtype)
            kv_cache_append(kc, vc, k, v, lengths - (window - 1), ring=True)  # positions cache-window..cache-1
        else:
            kc = torch.randn(b, cache, hkv, d, device=device).to(dtype)
            vc = torch.randn(b, cache, hkv, d, device=device).to(dtype)
        probs.append((q, kc, vc, lengths))
    kc = probs[0][1]
    return probs, 2 * kc.numel() * kc.element_size()


def rotating(fns):
    """A callable that runs fns[0], fns[1], ... in turn (one per call)."""
    state = {"i": 0}

    def run():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return run


def cpu_main(args, cfg):
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
                label = [dtype_name(dtype), t, "causal" if window == 0 else f"window {window}"]
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

    # Decode: 8 sequences, 4096 cached tokens each (the new token included), one query each; the
    # window row reads a ring cache of `win` slots (a sliding layer's cache).
    b, cache = 8, args.decode_cache
    drows = []
    for dtype in (torch.bfloat16, torch.float32):
        s = torch.randn(hq)
        (full,), nbytes = decode_case(b, cache, hq, hkv, d, dtype, "cpu")
        (ring,), rbytes = decode_case(b, cache, hq, hkv, d, dtype, "cpu", window=win)
        q, kc, vc, lengths = full
        ours_full = timed(lambda: attention_decode(q, kc, vc, lengths, s))
        drows.append([dtype_name(dtype), "causal", "ours", ours_full * 1e3, nbytes / ours_full / 1e9,
                      nbytes / ours_full / bw, 1.0])
        rq, rk, rv, rl = ring
        ours_ring = timed(lambda: attention_decode(rq, rk, rv, rl, s, window=win, ring=True))
        drows.append([dtype_name(dtype), f"window {win}, ring cache", "ours", ours_ring * 1e3,
                      rbytes / ours_ring / 1e9, rbytes / ours_ring / bw, ours_ring / ours_full])
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        sd = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        drows.append([dtype_name(dtype), "causal", "SDPA, no sinks (reference point)", sd * 1e3,
                      nbytes / sd / 1e9, nbytes / sd / bw, sd / ours_full])
    print_table(f"attention_decode, B={b}, {cache} cached tokens, Hq={hq}, Hkv={hkv}, D={d}, one new token",
                ["dtype", "mask", "impl", "ms", "KV GB/s", "of copy BW", "time / ours"], drows)


def sdpa_flash(device):
    """The SDPA flash backend on CUDA (a context manager); no restriction elsewhere (--smoke)."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def gpu_main(args, cfg):
    dev = args.device
    hq, hkv, d, win = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    scale = d ** -0.5
    dtype = torch.bfloat16
    bw = copy_bandwidth(dev)
    print(f"machine: {machine()}; commit {commit()}; device copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    min_time = args.min_time if args.min_time is not None else 0.2

    def timed(fn, inner=1):
        return time_fn(fn, device=dev, min_time=min_time, warmup=2, max_iters=200, inner=inner)

    # Prefill: B=1, ours (with sinks) vs SDPA flash (no sinks), forward and backward.
    rows, notes = [], []
    lengths = args.lengths if args.lengths is not None else ([64, 128] if args.smoke else [1024, 4096, 8192])
    for t in lengths:
        q = torch.randn(1, t, hq, d, device=dev).to(dtype)
        k = torch.randn(1, t, hkv, d, device=dev).to(dtype)
        v = torch.randn(1, t, hkv, d, device=dev).to(dtype)
        s = torch.randn(hq, device=dev)
        fwd_causal = None
        for window in (0, win):
            label = [t, "causal" if window == 0 else f"window {window}"]
            flops = 4 * d * hq * visible_pairs(t, window)
            fwd = timed(lambda: attention(q, k, v, s, window=window))
            fwd_causal = fwd_causal or fwd
            out, lse = attention(q, k, v, s, window=window)
            g = torch.randn_like(out)
            bwd = timed(lambda: attention_backward_op(g, q, k, v, s, out, lse, scale, window, 0))
            rows.append(label + ["ours forward", fwd * 1e3, flops / fwd / 1e12, 1.0])
            rows.append(label + ["ours backward", bwd * 1e3, 2.5 * flops / bwd / 1e12, bwd / fwd])
            if window:
                rows[-2][-1] = fwd / fwd_causal  # window forward: time vs our causal forward
                continue
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            try:  # a baseline that fails (backend unavailable) leaves a note, not a failed run
                with sdpa_flash(dev):
                    sd = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
                    qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
                    og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
                    gt = g.transpose(1, 2)
                    sdb = timed(lambda: torch.autograd.grad(og, (qg, kg, vg), gt, retain_graph=True))
            except RuntimeError as e:
                notes.append(f"SDPA flash at T={t} failed: {str(e).splitlines()[0]}")
                continue
            rows.append(label + ["SDPA flash is_causal, no sinks", sd * 1e3, flops / sd / 1e12, sd / fwd])
            rows.append(label + ["SDPA flash backward, no sinks", sdb * 1e3, 2.5 * flops / sdb / 1e12, sdb / fwd])
        del q, k, v
    print_table(f"attention prefill on {dev}, bfloat16, B=1, Hq={hq}, Hkv={hkv}, D={d} (FLOPs: 4 * D * Hq per "
                f"visible pair, causal ~ 4 * T * T / 2 * D * Hq; backward 2.5x)",
                ["T", "mask", "impl", "ms", "TFLOP/s", "time / ours fwd (window: / ours causal fwd)"], rows)
    for n in notes:
        print(f"- {n}")

    # Decode: KV bytes per call over the device copy bandwidth; rotate over cache copies so that
    # the bytes touched between two uses of one copy exceed the L2 (about 50 MB on H100).
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if torch.device(dev).type == "cuda" else 0
    drows = []
    s = torch.randn(hq, device=dev)
    batches = [2, 1] if args.smoke else [8, 1]
    caches = [64, 256] if args.smoke else [4096, 32768]
    for b in batches:
        for cache in caches + ["ring"]:
            window = win if cache == "ring" else 0
            ctx = max(caches[0], 2 * win) if cache == "ring" else cache  # ring: the last `win` of ctx tokens
            one = 2 * b * (window or ctx) * hkv * d * dtype.itemsize
            copies = max(1, min(1024, -(-4 * l2 // one)))
            probs, nbytes = decode_case(b, ctx, hq, hkv, d, dtype, dev, window=window, copies=copies)
            fns = [lambda p=p, w=window: attention_decode(p[0], p[1], p[2], p[3], s, window=w, ring=w > 0)
                   for p in probs]
            # Enough calls per timed sample to make the sync negligible (about 2 ms of work).
            inner = max(1, min(1000, int(2e-3 * bw / 2 / nbytes)))
            t = timed(rotating(fns), inner=inner)
            mask = f"window {win}, ring cache" if window else "causal"
            drows.append([b, ctx, mask, "ours", t * 1e6, nbytes / t / 1e9, nbytes / t / bw])
            if not window:
                sfns = [lambda p=p: F.scaled_dot_product_attention(p[0].transpose(1, 2), p[1].transpose(1, 2),
                                                                   p[2].transpose(1, 2), enable_gqa=True)
                        for p in probs]
                try:
                    st = timed(rotating(sfns), inner=inner)
                except RuntimeError as e:
                    print(f"- SDPA decode B={b} cache={ctx} failed: {str(e).splitlines()[0]}")
                    continue
                drows.append([b, ctx, mask, "SDPA (default backend), no sinks (reference point)", st * 1e6,
                              nbytes / st / 1e9, nbytes / st / bw])
            del probs, fns
    print_table(f"attention_decode on {dev}, bfloat16, Hq={hq}, Hkv={hkv}, D={d}, one new token "
                f"(target: ours >= 0.7 of copy BW)",
                ["B", "cached tokens", "mask", "impl", "us", "KV GB/s", "of copy BW"], drows)


def main():
    parser = argparse.ArgumentParser()
    default_dev = "cuda" if torch.cuda.is_available() and gptoss_ext.has_cuda_kernels() else "cpu"
    parser.add_argument("--device", default=default_dev, help="cpu: the CPU suite; cuda: the GPU suite")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: a quick logic check of the chosen suite; add --gpu-suite to run the "
                             "GPU suite's code on the CPU")
    parser.add_argument("--gpu-suite", action="store_true", help="run the GPU suite on --device (with --smoke on cpu)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prefill T values (default: CPU 1024 2048 4096; GPU 1024 4096 8192)")
    parser.add_argument("--decode-cache", type=int, default=4096, help="CPU decode: cached tokens per sequence")
    parser.add_argument("--oracle-gb", type=float, default=1.0,
                        help="run the eager oracle only while one float32 [B, Hq, T, T+1] logits tensor "
                             "stays under this many GB (it holds several such tensors at once)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timing per measurement (default: CPU 1.0, GPU 0.2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.preset("gpt-oss-20b")
    if args.device.startswith("cuda") or args.gpu_suite:
        gpu_main(args, cfg)
        return
    if args.smoke:
        args.lengths = args.lengths or [64]
        args.decode_cache = 256
        args.min_time = args.min_time if args.min_time is not None else 0.01
    args.lengths = args.lengths or [1024, 2048, 4096]
    args.min_time = args.min_time if args.min_time is not None else 1.0
    cpu_main(args, cfg)


if __name__ == "__main__":
    main()
