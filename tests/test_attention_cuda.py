"""CUDA attention kernels (spec §2.2): prefill, KV-cache append, split-K decode, backward.

Every test here needs a GPU and a CUDA build (conftest's requires_cuda). The oracle is a float64
computation in this file (explicit logits + sink column + mask + softmax), evaluated on the
(rounded) kernel inputs; kernel errors are bounded by 2x the error of the same oracle run in the
kernel's dtype (design.md, Tests). CUDA-vs-CPU tests run when the CPU kernels are registered;
opcheck runs the fake-tensor and autograd checks when gptoss_ext.ops registers them.
"""
import math

import pytest
import torch

from conftest import TOL, assert_close, assert_error_within, requires_cuda

pytestmark = requires_cuda

ops = torch.ops.gptoss_ext
DEV = "cuda"  # every tensor of these tests lives here
LOW = [torch.bfloat16, torch.float16]
# Absolute floor added to "2x the same-dtype reference error", per dtype (exact cases: both 0).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
LSE_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}
LSE_TOL_F32 = dict(atol=2e-4, rtol=2e-5)  # lse is float32 for every non-float64 dtype


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gptoss_ext::{op}", key)


try:
    from gptoss_ext import reference as _reference  # the project's oracle, when present in the tree
except ImportError:
    _reference = None


# --------------------------------------------------------------------------------- the oracle

def oracle(q, k, v, sinks=None, sm_scale=None, window=0, q_offset=0, dtype=torch.float64):
    """(out [B,Tq,Hq,D], lse [B,Hq,Tq]) computed in `dtype` on q's device, differentiable.

    Query i sits at position q_offset + i and sees key j iff j <= q_offset + i and (window == 0 or
    j > q_offset + i - window). The sink is an extra logit column with no value. Rows with no
    visible key and no sink: out 0, lse -inf.
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    qd = q.to(dtype)
    kd = k.to(dtype).repeat_interleave(G, dim=2)
    vd = v.to(dtype).repeat_interleave(G, dim=2)
    dev = q.device
    qpos = q_offset + torch.arange(Tq, device=dev)
    kpos = torch.arange(Tk, device=dev)
    vis = kpos[None, :] <= qpos[:, None]
    if window:
        vis = vis & (kpos[None, :] > qpos[:, None] - window)
    outs, lses = [], []
    # Heads in chunks so that the [B, h, Tq, Tk] logits stay below ~256 MB.
    hc = max(1, min(Hq, (256 << 20) // max(1, B * Tq * max(Tk, 1) * 8)))
    for h0 in range(0, Hq, hc):
        h1 = min(Hq, h0 + hc)
        logits = torch.einsum("bqhd,bkhd->bhqk", qd[:, :, h0:h1], kd[:, :, h0:h1]) * scale
        logits = logits.masked_fill(~vis, float("-inf"))
        if sinks is not None:
            col = sinks[h0:h1].to(dtype).view(1, h1 - h0, 1, 1).expand(B, h1 - h0, Tq, 1)
        else:
            col = torch.full((B, h1 - h0, Tq, 1), float("-inf"), dtype=dtype, device=dev)
        full = torch.cat([logits, col], dim=-1)
        lse = torch.logsumexp(full, dim=-1)
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(full - lse_safe[..., None])[..., :Tk]
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vd[:, :, h0:h1]))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


def make_qkv(B, Tq, Tk, Hq, Hkv, D, dtype, q_scale=1.0):
    dev = DEV
    q = (torch.randn(B, Tq, Hq, D, device=dev) * q_scale).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=dev).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, device=dev).to(dtype)
    return q, k, v


def make_sinks(kind, Hq):
    if kind is None:
        return None
    if kind == "normal":
        return torch.randn(Hq, device=DEV, dtype=torch.float32)
    return torch.full((Hq,), float(kind), device=DEV, dtype=torch.float32)


def check_forward(out, lse, q, k, v, sinks, scale, window, q_offset):
    """out within 2x the same-dtype oracle's error of the float64 oracle; lse close to it."""
    dtype = q.dtype
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not torch.isnan(out).any() and torch.isfinite(out).all()
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    out64, lse64 = oracle(q, k, v, sinks, scale, window, q_offset)
    if dtype == torch.float64:
        assert_close(out, out64, torch.float64)
    else:
        ref, _ = oracle(q, k, v, sinks, scale, window, q_offset, dtype=dtype)
        assert_error_within(out, out64, ref, factor=2.0, floor=FLOOR[dtype])
    tol = LSE_TOL.get(dtype, LSE_TOL_F32)
    torch.testing.assert_close(lse.double().cpu(), lse64.cpu(), **tol)


def run_and_check(B, Tq, Tk, Hq, Hkv, D, dtype, window, q_offset, sink_kind="normal", q_scale=1.0):
    q, k, v = make_qkv(B, Tq, Tk, Hq, Hkv, D, dtype, q_scale)
    sinks = make_sinks(sink_kind, Hq)
    scale = 1.0 / math.sqrt(D)
    out, lse = ops.attention(q, k, v, sinks, scale, window, q_offset)
    check_forward(out, lse, q, k, v, sinks, scale, window, q_offset)
    return q, k, v, sinks, out, lse


# ------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [0, 128, 5])
@pytest.mark.parametrize("T", [1, 7, 64, 129, 300, 1024])
def test_prefill_vs_oracle(T, window, dtype):
    run_and_check(B=2, Tq=T, Tk=T, Hq=8, Hkv=2, D=64, dtype=dtype, window=window, q_offset=0, q_scale=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_long(window, dtype):
    run_and_check(B=1, Tq=4096, Tk=4096, Hq=8, Hkv=1, D=64, dtype=dtype, window=window, q_offset=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 40])
@pytest.mark.parametrize("T,window", [(129, 128), (300, 0), (300, 5)])
def test_prefill_head_dims(T, window, D, dtype):
    run_and_check(B=2, Tq=T, Tk=T, Hq=4, Hkv=2, D=D, dtype=dtype, window=window, q_offset=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_gqa(window, G, dtype):
    run_and_check(B=2, Tq=300, Tk=300, Hq=2 * G, Hkv=2, D=64, dtype=dtype, window=window, q_offset=0)


def test_prefill_gpt_oss_shape():
    # gpt-oss: 64 query heads, 8 kv heads, head dim 64, sm_scale 1/8, window 128 on half the layers.
    for window in (0, 128):
        run_and_check(B=1, Tq=640, Tk=640, Hq=64, Hkv=8, D=64, dtype=torch.bfloat16, window=window, q_offset=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sink_kind", [None, "normal", 1e4, -1e4])
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_sinks(sink_kind, window, dtype):
    q, k, v, sinks, out, lse = run_and_check(B=2, Tq=200, Tk=200, Hq=8, Hkv=2, D=64, dtype=dtype,
                                             window=window, q_offset=0, sink_kind=sink_kind)
    if sink_kind == 1e4:  # the sink takes all the mass: out ~ 0, lse ~ 1e4, nothing infinite
        assert out.abs().max().item() == 0.0
        torch.testing.assert_close(lse, torch.full_like(lse, 1e4), atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Tq,Tk,q_offset,window", [
    (7, 107, 100, 0),       # decode-like chunk at the end of a long prefix
    (64, 1064, 1000, 128),  # chunked prefill with a window
    (129, 229, 100, 5),
    (50, 30, 0, 0),         # more queries than keys: the last rows see every key
    (1, 4096, 4095, 128),
])
def test_prefill_q_offset(Tq, Tk, q_offset, window, dtype):
    run_and_check(B=2, Tq=Tq, Tk=Tk, Hq=8, Hkv=2, D=64, dtype=dtype, window=window, q_offset=q_offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("sink_kind", [None, "normal"])
@pytest.mark.parametrize("Tq,Tk,q_offset,window", [
    (4, 10, 20, 5),    # every query's window lies past the last key: all rows empty
    (10, 30, 30, 5),   # positions 30..39 with keys 0..29: rows 0-3 see keys, rows 4-9 none
    (3, 0, 0, 0),      # no keys at all
])
def test_prefill_empty_rows(Tq, Tk, q_offset, window, sink_kind, dtype):
    q, k, v, sinks, out, lse = run_and_check(B=2, Tq=Tq, Tk=Tk, Hq=4, Hkv=2, D=64, dtype=dtype,
                                             window=window, q_offset=q_offset, sink_kind=sink_kind)
    qpos = q_offset + torch.arange(Tq, device=DEV)
    empty = (qpos - window + 1 > Tk - 1) if window else torch.full((Tq,), Tk == 0, device=DEV)
    assert empty.any()
    assert (out[:, empty] == 0).all()
    if sinks is None:
        assert torch.isneginf(lse[:, :, empty]).all()
    else:  # lse = sink, up to the rounding of sink * log2(e) * ln(2)
        want = sinks.view(1, -1, 1).expand(2, -1, int(empty.sum())).to(lse.dtype)
        torch.testing.assert_close(lse[:, :, empty], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_strided_inputs(dtype):
    # q, k, v as views of one packed qkv projection (token stride W + 8, a multiple of 8: the
    # tensor-core path reads them in place), and the same views shifted by one element (not
    # 16-byte aligned: copied first). Both must match the contiguous result exactly.
    B, T, Hq, Hkv, D = 2, 150, 8, 2, 64
    W = (Hq + 2 * Hkv) * D
    qkv = torch.randn(B, T, W + 8, device=DEV).to(dtype)
    sinks = make_sinks("normal", Hq)
    for off in (0, 1):
        base = qkv[..., off:off + W]
        q = base[..., :Hq * D].unflatten(-1, (Hq, D))
        k = base[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D))
        v = base[..., (Hq + Hkv) * D:].unflatten(-1, (Hkv, D))
        assert not q.is_contiguous() and q.stride(1) == W + 8
        out, lse = ops.attention(q, k, v, sinks, 0.125, 128, 0)
        out_c, lse_c = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), sinks, 0.125, 128, 0)
        torch.testing.assert_close(out, out_c, atol=0, rtol=0)
        torch.testing.assert_close(lse, lse_c, atol=0, rtol=0)


def test_prefill_sinks_dtypes():
    # sinks in any float dtype are used in float32.
    q, k, v = make_qkv(1, 65, 65, 4, 2, 64, torch.bfloat16)
    s32 = torch.randn(4, device=DEV)
    for sd in (torch.bfloat16, torch.float16, torch.float64):
        s = s32.to(sd)
        out, lse = ops.attention(q, k, v, s, 0.125, 0, 0)
        out_ref, lse_ref = ops.attention(q, k, v, s.float(), 0.125, 0, 0)
        torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
        torch.testing.assert_close(lse, lse_ref, atol=0, rtol=0)


def test_prefill_float64():
    for window, q_offset in ((0, 0), (5, 3), (128, 0)):
        run_and_check(B=2, Tq=150, Tk=150 + q_offset, Hq=4, Hkv=2, D=40, dtype=torch.float64,
                      window=window, q_offset=q_offset)


@pytest.mark.skipif(_reference is None or not hasattr(_reference, "attention"),
                    reason="gptoss_ext.reference.attention not in this tree")
def test_oracle_matches_project_reference():
    q, k, v = make_qkv(2, 140, 140, 8, 2, 64, torch.float64)
    sinks = torch.randn(8, device=DEV, dtype=torch.float64)
    for window, q_offset in ((0, 0), (128, 0), (5, 0)):
        kk, vv = k[:, :140], v[:, :140]
        o1, l1 = oracle(q, kk, vv, sinks, 0.125, window, q_offset)
        o2, l2 = _reference.attention(q, kk, vv, sinks=sinks, sm_scale=0.125, window=window, q_offset=q_offset)
        torch.testing.assert_close(o1, o2.double(), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(l1, l2.double(), atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(not _has_kernel("attention", "CPU"), reason="CPU attention kernel not in this build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,window,q_offset,G,D", [
    (129, 128, 0, 8, 64), (300, 0, 0, 4, 64), (64, 5, 17, 1, 128), (77, 0, 3, 2, 40),
])
def test_prefill_cuda_vs_cpu(T, window, q_offset, G, D, dtype):
    q, k, v = make_qkv(2, T, T + q_offset, 2 * G, 2, D, dtype)
    sinks = make_sinks("normal", 2 * G)
    out, lse = ops.attention(q, k, v, sinks, 1 / math.sqrt(D), window, q_offset)
    out_c, lse_c = ops.attention(q.cpu(), k.cpu(), v.cpu(), sinks.cpu(), 1 / math.sqrt(D), window, q_offset)
    assert_close(out, out_c, dtype)
    torch.testing.assert_close(lse.cpu(), lse_c, **LSE_TOL_F32)


# -------------------------------------------------------------------------------------- decode

def build_cache(k_hist, v_hist, lengths, S, ring, fill=float("nan")):
    """Caches [B, S, Hkv, D] holding positions [0, lengths[b]) of k_hist/v_hist (the last S of them
    with a ring, slot = position % S); every other slot is `fill` (NaN: reading one poisons the
    result)."""
    B, _, Hkv, D = k_hist.shape
    kc = torch.full((B, S, Hkv, D), fill, dtype=k_hist.dtype, device=k_hist.device)
    vc = torch.full_like(kc, fill)
    for b in range(B):
        L = int(lengths[b])
        lo = max(0, L - S) if ring else 0
        for pos in range(lo, L):
            kc[b, pos % S] = k_hist[b, pos]
            vc[b, pos % S] = v_hist[b, pos]
    return kc, vc


def decode_case(B, lengths, S, Tq, Hq, Hkv, D, dtype, window, ring, sink_kind="normal"):
    lengths_t = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    Lmax = max(lengths) + Tq
    k_full = torch.randn(B, Lmax, Hkv, D, device=DEV).to(dtype)
    v_full = torch.randn(B, Lmax, Hkv, D, device=DEV).to(dtype)
    q = (torch.randn(B, Tq, Hq, D, device=DEV) * 2).to(dtype)
    sinks = make_sinks(sink_kind, Hq)
    kc, vc = build_cache(k_full, v_full, lengths, S, ring)
    k_new = torch.stack([k_full[b, lengths[b]:lengths[b] + Tq] for b in range(B)])
    v_new = torch.stack([v_full[b, lengths[b]:lengths[b] + Tq] for b in range(B)])
    return q, k_full, v_full, k_new, v_new, kc, vc, lengths_t, sinks


def check_decode(out, lse, q, k_full, v_full, lengths, sinks, scale, window):
    for b, L in enumerate(lengths):
        Tq = q.shape[1]
        check_forward(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k_full[b:b + 1, :L + Tq],
                      v_full[b:b + 1, :L + Tq], sinks, scale, window, L)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("window", [0, 128])
def test_decode_ragged(window, Tq, dtype):
    lengths = [0, 5, 130, 1000]
    S = 1100
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(4, lengths, S, Tq, 16, 2, 64, dtype,
                                                                    window, ring=False)
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, False)
    out, lse = ops.attention_decode(q, kc, vc, lt, sinks, 0.125, window, False)
    check_decode(out, lse, q, k_full, v_full, lengths, sinks, 0.125, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Tq", [1, 4])
def test_decode_ring_wraparound(Tq, dtype):
    window = 128
    S = window + Tq - 1 + 3  # the smallest ring the check allows, plus 3
    lengths = [0, 50, S - 1, 300, 1000]
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(5, lengths, S, Tq, 16, 2, 64, dtype,
                                                                    window, ring=True)
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, True)
    out, lse = ops.attention_decode(q, kc, vc, lt, sinks, 0.125, window, True)
    check_decode(out, lse, q, k_full, v_full, lengths, sinks, 0.125, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_split_k(dtype):
    # B = 8, cache 4096 (the bandwidth target's shape): several key splits per kv head.
    B, S = 8, 4096
    lengths = [4000, 4095, 1, 2048, 3000, 17, 4090, 1234]
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(B, lengths, S, 1, 64, 8, 64, dtype,
                                                                    0, ring=False)
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, False)
    out, lse = ops.attention_decode(q, kc, vc, lt, sinks, 0.125, 0, False)
    check_decode(out, lse, q, k_full, v_full, lengths, sinks, 0.125, 0)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 40), (torch.float32, 40),
                                     (torch.float64, 64)])
@pytest.mark.parametrize("sink_kind", [None, 1e4, -1e4])
def test_decode_dims_dtypes_sinks(dtype, D, sink_kind):
    lengths = [3, 700]
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(2, lengths, 800, 2, 8, 2, D, dtype,
                                                                    0, ring=False, sink_kind=sink_kind)
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, False)
    out, lse = ops.attention_decode(q, kc, vc, lt, sinks, 1 / math.sqrt(D), 0, False)
    check_decode(out, lse, q, k_full, v_full, lengths, sinks, 1 / math.sqrt(D), 0)


@pytest.mark.parametrize("dtype", LOW)
def test_decode_matches_prefill(dtype):
    # attention_decode over a cache == attention over the same keys with q_offset = length.
    L, Tq, S = 777, 2, 1024
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(1, [L], S, Tq, 64, 8, 64, dtype,
                                                                    128, ring=False)
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, False)
    out_d, lse_d = ops.attention_decode(q, kc, vc, lt, sinks, 0.125, 128, False)
    out_p, lse_p = ops.attention(q, k_full[:, :L + Tq], v_full[:, :L + Tq], sinks, 0.125, 128, L)
    assert_close(out_d, out_p, dtype)
    torch.testing.assert_close(lse_d, lse_p, **LSE_TOL_F32)


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_kv_cache_append(ring, dtype):
    B, S, Hkv, D, Tn = 3, 16, 2, 8, 5
    kc = torch.randn(B, S, Hkv, D, device=DEV).to(dtype)
    vc = torch.randn(B, S, Hkv, D, device=DEV).to(dtype)
    # new tokens as a strided view (every other token of a longer tensor)
    k = torch.randn(B, 2 * Tn, Hkv, D, device=DEV).to(dtype)[:, ::2]
    v = torch.randn(B, 2 * Tn, Hkv, D, device=DEV).to(dtype)[:, ::2]
    lengths = [0, 7, 14] if ring else [0, 7, 11]
    if ring:
        lengths[2] = 30  # wraps: positions 30..34 -> slots 14, 15, 0, 1, 2
    lt = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    kc_want, vc_want = kc.clone(), vc.clone()
    for b in range(B):
        for i in range(Tn):
            slot = (lengths[b] + i) % S if ring else lengths[b] + i
            kc_want[b, slot] = k[b, i]
            vc_want[b, slot] = v[b, i]
    ops.kv_cache_append(kc, vc, k, v, lt, ring)
    torch.testing.assert_close(kc, kc_want, atol=0, rtol=0)
    torch.testing.assert_close(vc, vc_want, atol=0, rtol=0)


def test_kv_cache_append_bad_lengths_never_write_out_of_bounds():
    # The CUDA op cannot check device-side lengths without a sync (the Python cache object does);
    # it must still never write outside the cache. A canary batch row after each cache catches
    # overruns.
    B, S, Hkv, D, Tn = 3, 8, 2, 16, 4
    big_k = torch.randn(B + 1, S, Hkv, D, device=DEV)
    big_v = torch.randn(B + 1, S, Hkv, D, device=DEV)
    kc, vc = big_k[:B], big_v[:B]
    k_before, v_before = big_k.clone(), big_v.clone()
    k = torch.randn(B, Tn, Hkv, D, device=DEV)
    v = torch.randn(B, Tn, Hkv, D, device=DEV)
    lt = torch.tensor([-5, 6, 2**31 - 3], dtype=torch.int32, device=DEV)
    ops.kv_cache_append(kc, vc, k, v, lt, False)
    _sync()
    assert torch.equal(big_k[B], k_before[B]) and torch.equal(big_v[B], v_before[B])  # canaries
    assert torch.equal(kc[0], k_before[0])         # negative length: nothing written
    assert torch.equal(kc[1, 6:], k[1, :2])        # positions 6, 7 fit; 8, 9 are dropped
    assert torch.equal(vc[1, 6:], v[1, :2])
    assert torch.equal(kc[1, :6], k_before[1, :6])
    assert torch.equal(kc[2], k_before[2])         # huge length: nothing fits


def test_decode_bad_lengths_are_safe():
    # Negative or absurd lengths give finite output (rows see no key), no out-of-bounds read.
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(2, [5, 9], 64, 1, 8, 2, 64,
                                                                    torch.bfloat16, 0, ring=False)
    kc = torch.nan_to_num(kc)
    vc = torch.nan_to_num(vc)
    bad = torch.tensor([-7, 2**31 - 1], dtype=torch.int32, device=DEV)
    out, lse = ops.attention_decode(q, kc, vc, bad, sinks, 0.125, 0, False)
    _sync()
    assert torch.isfinite(out).all() and (out == 0).all()
    torch.testing.assert_close(lse, sinks.view(1, -1, 1).expand_as(lse), atol=1e-6, rtol=1e-6)


def test_decode_cuda_graph_capture():
    # append + decode are capturable (lengths are read on the device), and a replay with new
    # lengths and inputs matches eager execution.
    B, S, Hq, Hkv, D, Tq = 4, 512, 16, 2, 64, 1
    dtype = torch.bfloat16
    lengths = [10, 100, 200, 400]
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(B, lengths, S, Tq, Hq, Hkv, D, dtype,
                                                                    0, ring=False)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    s_q, s_k, s_v, s_l = q.clone(), k_new.clone(), v_new.clone(), lt.clone()
    s_kc, s_vc = kc.clone(), vc.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            ops.kv_cache_append(s_kc, s_vc, s_k, s_v, s_l, False)
            ops.attention_decode(s_q, s_kc, s_vc, s_l, sinks, 0.125, 0, False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_cache_append(s_kc, s_vc, s_k, s_v, s_l, False)
        g_out, g_lse = ops.attention_decode(s_q, s_kc, s_vc, s_l, sinks, 0.125, 0, False)
    new_lengths = torch.tensor([11, 101, 201, 401], dtype=torch.int32, device=DEV)
    q2 = torch.randn_like(q)
    k2, v2 = torch.randn_like(k_new), torch.randn_like(v_new)
    s_q.copy_(q2), s_k.copy_(k2), s_v.copy_(v2), s_l.copy_(new_lengths)
    e_kc, e_vc = s_kc.clone(), s_vc.clone()
    graph.replay()
    ops.kv_cache_append(e_kc, e_vc, k2, v2, new_lengths, False)
    e_out, e_lse = ops.attention_decode(q2, e_kc, e_vc, new_lengths, sinks, 0.125, 0, False)
    _sync()
    torch.testing.assert_close(g_out, e_out, atol=0, rtol=0)
    torch.testing.assert_close(g_lse, e_lse, atol=0, rtol=0)
    torch.testing.assert_close(s_kc, e_kc, atol=0, rtol=0)


@pytest.mark.skipif(not _has_kernel("attention_decode", "CPU"), reason="CPU decode kernel not in this build")
@pytest.mark.parametrize("ring", [False, True])
def test_decode_cuda_vs_cpu(ring):
    window = 128 if ring else 0
    S = 140 if ring else 700
    lengths = [3, 600]
    q, k_full, v_full, k_new, v_new, kc, vc, lt, sinks = decode_case(2, lengths, S, 2, 16, 2, 64,
                                                                    torch.bfloat16, window, ring=ring)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    kc_c, vc_c = kc.cpu(), vc.cpu()
    ops.kv_cache_append(kc, vc, k_new, v_new, lt, ring)
    ops.kv_cache_append(kc_c, vc_c, k_new.cpu(), v_new.cpu(), lt.cpu(), ring)
    assert torch.equal(kc.cpu(), kc_c) and torch.equal(vc.cpu(), vc_c)
    out, lse = ops.attention_decode(q, kc, vc, lt, sinks, 0.125, window, ring)
    out_c, lse_c = ops.attention_decode(q.cpu(), kc_c, vc_c, lt.cpu(), sinks.cpu(), 0.125, window, ring)
    assert_close(out, out_c, torch.bfloat16)
    torch.testing.assert_close(lse.cpu(), lse_c, **LSE_TOL_F32)


# ------------------------------------------------------------------------------------ backward

def backward_case(B, T, Tk, Hq, Hkv, D, dtype, window, q_offset, sink_kind, sink_dtype=torch.float32):
    q, k, v = make_qkv(B, T, Tk, Hq, Hkv, D, dtype, q_scale=1.5)
    sinks = make_sinks(sink_kind, Hq)
    if sinks is not None:  # float64 runs (gradcheck precision) get float64 sinks
        sinks = sinks.to(torch.float64 if dtype == torch.float64 else sink_dtype)
    scale = 1.0 / math.sqrt(D)
    out, lse = ops.attention(q, k, v, sinks, scale, window, q_offset)
    dout = torch.randn_like(out)
    grads = ops.attention_backward(dout, q, k, v, sinks, out, lse, scale, window, q_offset)
    return q, k, v, sinks, scale, dout, grads


def oracle_grads(q, k, v, sinks, scale, window, q_offset, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    s = sinks.detach().to(dtype).requires_grad_(True) if sinks is not None else None
    out, _ = oracle(*leaves, s, scale, window, q_offset, dtype=dtype)
    (out * dout.to(dtype)).sum().backward()
    return [t.grad for t in leaves] + [s.grad if s is not None else None]


def check_backward(q, k, v, sinks, scale, window, q_offset, dout, grads):
    dtype = q.dtype
    dq, dk, dv, ds = grads
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if sinks is None:
        assert ds.numel() == 0
    else:
        assert ds.shape == sinks.shape and ds.dtype == sinks.dtype
    want = oracle_grads(q, k, v, sinks, scale, window, q_offset, dout, torch.float64)
    same = None if dtype == torch.float64 else oracle_grads(q, k, v, sinks, scale, window, q_offset, dout, dtype)
    for i, (got, w) in enumerate(zip((dq, dk, dv, ds), want)):
        if w is None:
            continue
        assert torch.isfinite(got).all()
        if dtype == torch.float64:
            torch.testing.assert_close(got, w, atol=1e-9, rtol=1e-9)
        else:
            mag = max(1.0, w.abs().max().item())
            floor = FLOOR[dtype] * mag
            if i == 3 and sinks.dtype != torch.float32:  # grad_sinks rounded to the sinks' dtype
                floor += TOL[sinks.dtype]["atol"] * mag
            assert_error_within(got, w, same[i], factor=2.0, floor=floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("window", [0, 128, 5])
@pytest.mark.parametrize("T,G", [(7, 1), (129, 4), (300, 2)])
def test_backward_vs_oracle(T, G, window, dtype):
    args = backward_case(2, T, T, 2 * G, 2, 64, dtype, window, 0, "normal")
    q, k, v, sinks, scale, dout, grads = args
    check_backward(q, k, v, sinks, scale, window, 0, dout, grads)


@pytest.mark.parametrize("sink_kind,sink_dtype", [(None, torch.float32), ("normal", torch.bfloat16),
                                                  (1e4, torch.float32), (-1e4, torch.float32)])
@pytest.mark.parametrize("D,q_offset", [(64, 0), (40, 9), (128, 3)])
def test_backward_sinks_dims_offsets(sink_kind, sink_dtype, D, q_offset):
    T = 140
    q, k, v, sinks, scale, dout, grads = backward_case(1, T, T + q_offset, 4, 2, D, torch.float32, 128,
                                                       q_offset, sink_kind, sink_dtype)
    check_backward(q, k, v, sinks, scale, 128, q_offset, dout, grads)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,q_offset,window,G", [(200, 0, 128, 8), (130, 7, 0, 1), (70, 0, 5, 4)])
def test_backward_tensor_core_shapes(T, q_offset, window, G, D, dtype):
    # bf16/fp16 with D 64/128 take the tensor-core backward: GQA groups, offsets, windows, partial tiles.
    q, k, v, sinks, scale, dout, grads = backward_case(2, T, T + q_offset, 2 * G, 2, D, dtype, window,
                                                       q_offset, "normal")
    check_backward(q, k, v, sinks, scale, window, q_offset, dout, grads)


@pytest.mark.skipif(not _has_kernel("attention_backward", "CPU"), reason="CPU backward kernel not in this build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_cuda_vs_cpu(dtype):
    q, k, v, sinks, scale, dout, grads = backward_case(2, 150, 150, 8, 2, 64, dtype, 128, 0, "normal")
    out, lse = ops.attention(q, k, v, sinks, scale, 128, 0)
    grads_c = ops.attention_backward(dout.cpu(), q.cpu(), k.cpu(), v.cpu(), sinks.cpu(), out.cpu(), lse.cpu(),
                                     scale, 128, 0)
    for got, want in zip(grads, grads_c):
        assert_close(got, want, dtype, scale=4.0)


def test_backward_is_deterministic():
    q, k, v, sinks, scale, dout, grads = backward_case(1, 300, 300, 8, 2, 64, torch.bfloat16, 0, 0, "normal")
    out, lse = ops.attention(q, k, v, sinks, scale, 0, 0)
    again = ops.attention_backward(dout, q, k, v, sinks, out, lse, scale, 0, 0)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- opcheck

def _opcheck(op: str, args):
    utils = ["test_schema"]
    if _has_kernel(op, "Meta"):
        utils += ["test_faketensor", "test_aot_dispatch_dynamic"]
    if _has_kernel(op, "Autograd") or _has_kernel(op, "AutogradCUDA"):
        utils += ["test_autograd_registration"]
    torch.library.opcheck(getattr(ops, op).default, args, test_utils=utils)


def test_opcheck_cuda():
    q, k, v = make_qkv(2, 70, 70, 8, 2, 64, torch.bfloat16)
    sinks = make_sinks("normal", 8)
    _opcheck("attention", (q, k, v, sinks, 0.125, 128, 0))
    _opcheck("attention", (q.float(), k.float(), v.float(), None, 0.125, 0, 0))
    out, lse = ops.attention(q, k, v, sinks, 0.125, 128, 0)
    _opcheck("attention_backward", (torch.randn_like(out), q, k, v, sinks, out, lse, 0.125, 128, 0))
    kc = torch.randn(2, 256, 2, 64, device=DEV).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    lt = torch.tensor([5, 100], dtype=torch.int32, device=DEV)
    _opcheck("kv_cache_append", (kc, vc, k[:, :3], v[:, :3], lt, False))
    _opcheck("attention_decode", (q[:, :3], kc, vc, lt, sinks, 0.125, 128, False))


def test_bad_arguments_raise():
    q, k, v = make_qkv(1, 8, 8, 4, 2, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="sm_scale"):
        ops.attention(q, k, v, None, -1.0, 0, 0)
    with pytest.raises(RuntimeError, match="heads"):
        ops.attention(q[:, :, :3], k, v, None, 0.125, 0, 0)
    with pytest.raises(RuntimeError, match="device"):
        ops.attention(q, k.cpu(), v.cpu(), None, 0.125, 0, 0)
