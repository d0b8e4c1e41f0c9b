"""gptoss.analysis and the GPT-2 baseline: counts against the spec (§1.2) and the published GPT-2
sizes, against instantiated models, torch's FLOP counter, our KV caches, and transformers' GPT-2."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gptoss import ModelConfig, Transformer, analysis
from gptoss.cli import main
from gptoss.gpt2 import GPT2, GPT2_PRESETS, GPT2Config
from gptoss_ext import reference

TINY = ModelConfig.preset("tiny-test")  # 3 layers, window 8, GQA 4/2, 4 experts top-2


def test_gptoss_counts_match_the_spec():
    # spec §1.2 (these equal the model card's 20.91B / 3.61B and 116.83B / 5.13B and the hub's byte count)
    for name, total, active, nbytes in (("gpt-oss-20b", 20_914_757_184, 3_608_307_264, 13_761_264_768),
                                        ("gpt-oss-120b", 116_829_156_672, 5_132_849_472, 65_248_815_744)):
        cfg = ModelConfig.preset(name)
        b = analysis.parameter_breakdown(cfg)
        assert sum(b.values()) == total and analysis.active_parameters(cfg) == active
        assert analysis.weight_bytes(cfg) == nbytes
        assert b["embedding"] == b["unembedding"] == 201088 * 2880
        assert b["experts"] == cfg.num_hidden_layers * cfg.num_experts * 24_891_840  # one expert, spec §1.2


def test_gpt2_counts_match_the_released_models():
    # Hugging Face's parameter counts of the four GPT-2 checkpoints (tied unembedding counted once)
    known = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, n in known.items():
        assert sum(analysis.parameter_breakdown(GPT2_PRESETS[name]).values()) == n, name
    assert sum(p.numel() for p in GPT2(GPT2_PRESETS["gpt2-medium"], device="meta").parameters()) == 354_823_168


@pytest.mark.parametrize("cfg", [TINY, ModelConfig.preset("gpt-oss-20b", num_hidden_layers=2)])
def test_breakdown_and_matrix_params_equal_the_model(cfg):
    model = Transformer(cfg, mxfp4=False, dtype=torch.bfloat16, device="meta")
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == sum(analysis.parameter_breakdown(cfg).values())
    assert {n: tuple(p.shape) for n, p in params.items()} == analysis.parameter_shapes(cfg)
    # matrices one token multiplies with: all but the experts, which count k / E of theirs
    k_of_e = cfg.experts_per_token / cfg.num_experts
    matrices = sum(p.numel() * (k_of_e if "mlp1_weight" in n or "mlp2_weight" in n else 1)
                   for n, p in params.items() if n.endswith("weight") and n != "embedding.weight")
    assert analysis.matrix_params_per_token(cfg) == matrices


def test_gpt2_forward_matches_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=40)
    ours = GPT2(cfg).init_weights(seed=int(torch.randint(0, 2**31, ())))
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=40, attn_implementation="eager",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    tokens = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="exceed n_positions"):
        ours(torch.zeros(1, 41, dtype=torch.long))


def test_flops_match_torch_flop_counter():
    # GPT-2 (plain PyTorch): every matrix product of a forward, counted by torch (CPU SDPA is not)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=40)
    model = GPT2(cfg).init_weights(1)
    T = 24
    with FlopCounterMode(display=False) as fc:
        model(torch.randint(0, 300, (1, T)))
    assert fc.get_total_flops() == 2 * T * analysis.matrix_params_per_token(cfg)
    # attention: 4 x heads x head_dim per (query, key) pair, counted on the dense oracle (all pairs)
    c = TINY
    q = torch.randn(1, T, c.num_attention_heads, c.head_dim)
    kv = torch.randn(1, T, c.num_key_value_heads, c.head_dim)
    with FlopCounterMode(display=False) as fc:
        reference.attention(q, kv, kv.clone())
    dense_one_layer = (analysis.forward_flops(c, T, causal=False)
                       - 2 * T * analysis.matrix_params_per_token(c)) // c.num_hidden_layers
    assert fc.get_total_flops() == dense_one_layer


def test_attention_flops_follow_windows_and_causality():
    c = TINY  # layers: sliding (window 8), full, sliding
    per_key = 4 * c.num_attention_heads * c.head_dim
    assert analysis.attention_flops(c, 0) == 3 * per_key
    assert analysis.attention_flops(c, 99) == per_key * (8 + 100 + 8)
    assert analysis.forward_flops(c, 5) == sum(analysis.flops_per_token(c, p) for p in range(5))
    g = GPT2_PRESETS["gpt2"]
    assert analysis.attention_flops(g, 9) == 4 * 768 * 10 * 12


def test_kv_cache_bytes_equal_our_caches():
    # window 128: the ring of a 1-token step is exactly 128 slots, so allocation == what is needed
    cfg = ModelConfig.preset("gpt-oss-20b", num_hidden_layers=4)
    model = Transformer(cfg, mxfp4=True, dtype=torch.bfloat16, device="meta")
    for ctx in (100, 1000):
        caches = model.new_caches(3, ctx, max_step=1)
        allocated = sum((c.k.numel() + c.v.numel()) * c.k.element_size() for c in caches)
        assert analysis.kv_cache_bytes(cfg, ctx, batch=3) == allocated
    g = GPT2_PRESETS["gpt2"]
    assert analysis.kv_cache_bytes(g, 1024) == 12 * 2 * 768 * 1024 * 2


def test_decode_bytes_against_active_parameters():
    # dense experts at context 0: every active parameter once at 2 bytes, float32 norms and sinks
    # (2 more bytes each), one embedding row, and the one key/value row per layer
    cfg = ModelConfig.preset("gpt-oss-20b")
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    f32_extra = 2 * ((2 * L + 1) * d + L * cfg.num_attention_heads)
    kv = L * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    dense = analysis.decode_bytes_per_token(cfg, 0, "dense")
    assert dense == 2 * analysis.active_parameters(cfg) + f32_extra + 2 * d + kv
    per_expert_dense = 3 * cfg.intermediate_size * d * 2
    per_expert_mxfp4 = 3 * cfg.intermediate_size * d * 17 // 32  # 4.25 bits per weight
    assert dense - analysis.decode_bytes_per_token(cfg, 0) == L * 4 * (per_expert_dense - per_expert_mxfp4)
    with pytest.raises(ValueError, match="experts must be"):
        analysis.decode_bytes_per_token(cfg, 0, "fp8")


def test_report_and_cli(capsys):
    text = analysis.report({"gpt2": GPT2_PRESETS["gpt2"], "gpt-oss-20b": ModelConfig.preset("gpt-oss-20b")}, 2048)
    assert "| **total** | **124,439,808** | **20,914,757,184** |" in text
    assert "n_positions is below 2048" in text
    assert main(["report", "gpt-oss-120b", "--context", "128"]) == 0
    assert "116,829,156,672" in capsys.readouterr().out
    assert main(["report", "gpt-5"]) == 1
    assert "unknown configuration 'gpt-5'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_embd .* multiple of n_head"):
        GPT2Config(n_embd=100, n_head=3)


def test_study_reports_routing_and_sinks():
    model = Transformer.from_config(TINY, seed=31, dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 21))
    st = analysis.study(model, tokens)
    with torch.no_grad():
        assert torch.equal(st["logits"], model(tokens))  # observing changes nothing
    assert all(b.attn.observer is None and b.mlp.observer is None for b in model.block)
    L, E, k = TINY.num_hidden_layers, TINY.num_experts, TINY.experts_per_token
    assert st["expert_counts"].shape == (L, E) and (st["expert_counts"].sum(1) == 2 * 21 * k).all()
    assert st["sink_mass"].shape == (L, TINY.num_attention_heads)
    assert ((st["sink_mass"] > 0) & (st["sink_mass"] < 1)).all()
    with torch.no_grad():  # a huge sink takes all attention, a tiny one none; a huge router bias wins every token
        model.block[0].attn.sinks.fill_(40.0)
        model.block[2].attn.sinks.fill_(-40.0)
        model.block[1].mlp.gate.bias[3] = 1e4
    st = analysis.study(model, tokens)
    assert st["sink_mass"][0].min() > 0.999 and st["sink_mass"][2].max() < 1e-6
    assert st["expert_counts"][1, 3] == 2 * 21
    text = analysis.study_report(st, TINY.layer_types)
    assert "| 0 | sliding | 1.000 |" in text and "| 1 | full |" in text


def test_cli_study(tmp_path, capsys):
    pytest.importorskip("bpe_openai")
    cfg = ModelConfig.preset("tiny-test", vocab_size=201088)
    ckpt = tmp_path / "ckpt"
    Transformer.from_config(cfg, seed=5, dtype=torch.bfloat16).save_checkpoint(str(ckpt))
    assert main(["study", str(ckpt), "--prompt", "The quick brown fox", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 tokens;") and out.count("\n| ") == 1 + cfg.num_hidden_layers  # header + layers


# ------------------------------------------------------------------------------ figures (gptoss.viz)

def test_visibility_is_read_off_the_attention_oracle():
    viz = pytest.importorskip("gptoss.viz")
    for w in (0, 5):
        p = viz.visibility(w, 12)
        for i in range(12):
            n = min(i + 1, w) if w else i + 1
            seen = (p[i] > 0).nonzero().flatten().tolist()
            assert seen == list(range(i + 1 - n, i + 1))
            # equal logits: each visible key and the sink (logit 0) share the row equally
            torch.testing.assert_close(p[i, seen], torch.full((n,), 1.0 / (n + 1), dtype=torch.float64))


def test_figures_show_the_analysis_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    from gptoss import viz
    configs = viz.default_configs()
    fig = viz.parameter_breakdown(configs)
    heights = {}
    for bar in fig.axes[0].patches:  # stacked bars: the components of each configuration add up
        x = round(bar.get_x() + bar.get_width() / 2)
        heights[x] = heights.get(x, 0.0) + bar.get_height()
    for i, cfg in enumerate(configs.values()):
        assert heights[i] == pytest.approx(sum(analysis.parameter_breakdown(cfg).values()) / 1e9, rel=1e-9)
    fig = viz.per_token_costs(configs, max_context=1024)
    line = fig.axes[1].get_lines()[1]  # gpt-oss-20b's KV cache
    assert list(line.get_xdata()) == [16, 32, 64, 128, 256, 512, 1024]
    assert list(line.get_ydata()) == [analysis.kv_cache_bytes(configs["gpt-oss-20b"], c) / 2 ** 30
                                      for c in line.get_xdata()]
    model = Transformer.from_config(TINY, seed=2, dtype=torch.float32)
    paths = viz.save_figures(str(tmp_path), model, torch.randint(0, TINY.vocab_size, (1, 30)))
    assert sorted(p.split("/")[-1] for p in paths) == ["attention_patterns.png", "parameters.png",
                                                      "per_token_costs.png", "study.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert main(["figures", str(tmp_path / "f")]) == 0
    assert main(["figures", str(tmp_path / "g"), "--checkpoint", "x"]) == 1


def test_architecture_doc_is_current():
    pytest.importorskip("matplotlib")
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("architecture_doc", os.path.join(root, "scripts",
                                                                                   "architecture_doc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(root, "docs", "architecture.md")) as f:
        assert f.read() == mod.render(), "docs/architecture.md is stale: run python scripts/architecture_doc.py"
    for name in ("attention_patterns", "parameters", "per_token_costs"):
        assert os.path.exists(os.path.join(root, "docs", "figures", name + ".png"))
