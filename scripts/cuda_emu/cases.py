B16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
import itertools
groups = {}
groups["prefill"] = [("test_prefill_vs_oracle", (T, w, d)) for T in (1, 7, 64, 129, 300) for w in (0, 128, 5) for d in (B16, F16, F32)]
groups["prefill_big"] = [("test_prefill_vs_oracle", (1024, w, B16)) for w in (0, 128)]
groups["dims"] = [("test_prefill_head_dims", (T, w, D, d)) for (T, w) in ((129, 128), (300, 0), (300, 5)) for D in (64, 128, 40) for d in (B16, F16, F32)]
groups["gqa"] = [("test_prefill_gqa", (w, G, d)) for w in (0, 128) for G in (1, 4, 8) for d in (B16, F16)]
groups["sinks"] = [("test_prefill_sinks", (s, w, d)) for s in (None, "normal", 1e4, -1e4) for w in (0, 128) for d in (B16, F32)]
groups["qoff"] = [("test_prefill_q_offset", (Tq, Tk, qo, w, d)) for (Tq, Tk, qo, w) in ((7, 107, 100, 0), (64, 1064, 1000, 128), (129, 229, 100, 5), (50, 30, 0, 0), (1, 4096, 4095, 128)) for d in (B16, F32)]
groups["empty"] = [("test_prefill_empty_rows", (Tq, Tk, qo, w, s, d)) for (Tq, Tk, qo, w) in ((4, 10, 20, 5), (10, 30, 30, 5), (3, 0, 0, 0)) for s in (None, "normal") for d in (B16, F16, F32, F64)]
groups["misc"] = [("test_prefill_strided_inputs", (B16,)), ("test_prefill_strided_inputs", (F32,)), ("test_prefill_sinks_dtypes", ()), ("test_prefill_float64", ()), ("test_prefill_gpt_oss_shape", ())]
groups["decode"] = ([("test_decode_ragged", (w, Tq, d)) for w in (0, 128) for Tq in (1, 3) for d in (B16, F16, F32)]
                    + [("test_decode_ring_wraparound", (Tq, d)) for Tq in (1, 4) for d in (B16, F32)]
                    + [("test_decode_dims_dtypes_sinks", (d, D, s)) for (d, D) in ((B16, 128), (F16, 40), (F32, 40), (F64, 64)) for s in (None, 1e4, -1e4)]
                    + [("test_decode_matches_prefill", (d,)) for d in (B16, F16)]
                    + [("test_kv_cache_append", (r, d)) for r in (False, True) for d in (B16, F32, F64)]
                    + [("test_kv_cache_append_bad_lengths_never_write_out_of_bounds", ()), ("test_decode_bad_lengths_are_safe", ())])
groups["split"] = [("test_decode_split_k", (d,)) for d in (B16, F16)]
groups["bwd"] = ([("test_backward_vs_oracle", (T, G, w, d)) for (T, G) in ((7, 1), (129, 4), (300, 2)) for w in (0, 128, 5) for d in (B16, F32, F64)]
                 + [("test_backward_sinks_dims_offsets", (s, sd, D, qo)) for (s, sd) in ((None, F32), ("normal", B16), (1e4, F32), (-1e4, F32)) for (D, qo) in ((64, 0), (40, 9), (128, 3))]
                 + [("test_backward_is_deterministic", ())] + [("test_backward_tensor_core_shapes", (T, qo, w, G, D, d)) for (T, qo, w, G) in ((200, 0, 128, 8), (130, 7, 0, 1), (70, 0, 5, 4)) for D in (64, 128) for d in (B16, F16)])
sel = []
for w in which:
    if w in groups: sel += groups[w]
    else:
        g, i = w.split(":"); sel.append(groups[g][int(i)])
nfail = 0
for fn, args in sel:
    nfail += not run(fn, getattr(t, fn), *args)
print("FAILED:", nfail, "of", len(sel))
