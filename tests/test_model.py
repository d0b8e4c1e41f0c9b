"""The complete model: against a whole-model oracle built from gptoss_ext.reference, incremental
decoding against the full forward, checkpoints (MXFP4 vs dequantised), and parity with Hugging Face
transformers' GptOssForCausalLM in both directions."""
import json
import math

import pytest
import torch

from gptoss import ModelConfig, Transformer
from gptoss_ext import reference

TINY = ModelConfig.preset("tiny-test")  # 3 layers, window 8, GQA 4/2, YaRN, 4 experts top-2


def oracle_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The forward pass of spec §2 written with the oracle's functions, in float64."""
    cfg = model.cfg
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    b, t = tokens.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = reference.rope_cos_sin(torch.arange(t), hd, cfg.rope_theta, cfg.rope_scaling_factor,
                                      cfg.initial_context_length, cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    x = sd["embedding.weight"][tokens]
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        h = reference.rms_norm(x, sd[p + "attn.norm.scale"], cfg.rms_norm_eps)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q = reference.apply_rope(qkv[..., : hq * hd].reshape(b, t, hq, hd), cos, sin)
        k = reference.apply_rope(qkv[..., hq * hd: (hq + hkv) * hd].reshape(b, t, hkv, hd), cos, sin)
        v = qkv[..., (hq + hkv) * hd:].reshape(b, t, hkv, hd)
        o, _ = reference.attention(q, k, v, sd[p + "attn.sinks"], 1 / math.sqrt(hd), cfg.window(n))
        x = x + o.reshape(b, t, hq * hd) @ sd[p + "attn.out.weight"].T + sd[p + "attn.out.bias"]
        h = reference.rms_norm(x, sd[p + "mlp.norm.scale"], cfg.rms_norm_eps).reshape(b * t, -1)
        w1 = (sd[p + "mlp.mlp1_weight.blocks"], sd[p + "mlp.mlp1_weight.scales"]) \
            if p + "mlp.mlp1_weight.blocks" in sd else sd[p + "mlp.mlp1_weight"]
        w2 = (sd[p + "mlp.mlp2_weight.blocks"], sd[p + "mlp.mlp2_weight.scales"]) \
            if p + "mlp.mlp2_weight.blocks" in sd else sd[p + "mlp.mlp2_weight"]
        y = reference.moe_mlp(h, sd[p + "mlp.gate.weight"], sd[p + "mlp.gate.bias"], w1, sd[p + "mlp.mlp1_bias"],
                              w2, sd[p + "mlp.mlp2_bias"], k=cfg.experts_per_token, alpha=cfg.swiglu_alpha,
                              limit=cfg.swiglu_limit)
        x = x + y.reshape(b, t, -1)
    return reference.rms_norm(x, sd["norm.scale"], cfg.rms_norm_eps) @ sd["unembedding.weight"].T


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mxfp4", [False, True])
def test_forward_matches_oracle(mxfp4):
    model = Transformer.from_config(TINY, seed=1, mxfp4=mxfp4, dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 21))  # > window: the band is exercised
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 21, TINY.vocab_size) and logits.dtype == torch.float32
    assert rel_err(logits, oracle_logits(model, tokens)) < 1e-5


def test_incremental_decode_matches_full_forward():
    model = Transformer.from_config(TINY, seed=2, dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 30))  # past 3 windows: ring wrap-around
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, 64, max_step=3)
        steps = [model(tokens[:, :10], caches)]
        for s in range(10, 19, 3):  # a few multi-token steps (speculative-decoding shape)
            steps.append(model(tokens[:, s:s + 3], caches))
        for s in range(19, 30):
            steps.append(model(tokens[:, s:s + 1], caches))
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_ragged_batch_prefill_then_decode():
    model = Transformer.from_config(TINY, seed=3, dtype=torch.float32)
    lens = [13, 6]
    seqs = [torch.randint(0, TINY.vocab_size, (n + 5,)) for n in lens]
    with torch.no_grad():
        caches = model.new_caches(2, 64)
        padded = torch.zeros(2, max(lens), dtype=torch.long)
        for i, n in enumerate(lens):
            padded[i, :n] = seqs[i][:n]
        first = model(padded, caches, advance=lens)
        outs = [[first[i, n - 1]] for i, n in enumerate(lens)]
        for s in range(5):
            step = torch.stack([seqs[i][n + s] for i, n in enumerate(lens)])[:, None]
            logits = model(step, caches)
            for i in range(2):
                outs[i].append(logits[i, 0])
        for i, n in enumerate(lens):
            alone = model(seqs[i][None, : n + 5])[0, n - 1:]
            assert rel_err(torch.stack(outs[i]), alone) < 1e-5


def _ragged_prompts(model, lens, extra):
    """Random sequences of lens[i] + extra tokens and the right-padded [B, max(lens)] prompt batch."""
    seqs = [torch.randint(0, model.cfg.vocab_size, (n + extra,)) for n in lens]
    padded = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        padded[i, :n] = seqs[i][:n]
    return seqs, padded


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decode_step_compiles_once(backend):
    from torch._dynamo.utils import counters
    model = Transformer.from_config(TINY, seed=8, mxfp4=True, dtype=torch.float32)
    lens, steps = [14, 5], 54  # sequence 0 passes 64 tokens: the sliding layers' 64-slot ring wraps
    seqs, padded = _ragged_prompts(model, lens, steps)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager_caches, compiled_caches = (model.new_caches(2, 80, max_step=16) for _ in range(2))
        assert eager_caches[0].ring and eager_caches[0].slots == 64
        step = model.compile_decode(backend=backend)
        outs = []
        for caches in (eager_caches, compiled_caches):
            model(padded, caches, advance=lens)
        for s in range(steps):
            tok = torch.stack([seqs[i][n + s] for i, n in enumerate(lens)])[:, None]
            eager = model.decode_step(tok, eager_caches)
            compiled = step(tok, compiled_caches)
            assert rel_err(compiled, eager) < 1e-6
            outs.append(compiled[:, 0])
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step (and no recompile)
    assert compiled_caches[0].host_lengths == [n + steps for n in lens]
    assert compiled_caches[0].lengths.tolist() == compiled_caches[0].host_lengths
    with torch.no_grad():
        for i, n in enumerate(lens):
            alone = model(seqs[i][None, : n + steps])[0, n:]
            assert rel_err(torch.stack([o[i] for o in outs]), alone) < 1e-5


def test_decode_step_checks_room_before_writing():
    model = Transformer.from_config(TINY, seed=9, dtype=torch.float32)
    caches = model.new_caches(1, 4)
    with torch.no_grad():
        model(torch.randint(0, TINY.vocab_size, (1, 4)), caches)
        k_before = caches[0].k.clone()
        with pytest.raises(ValueError, match="cache overflow"):
            model.decode_step(torch.randint(0, TINY.vocab_size, (1, 1)), caches)
    assert torch.equal(caches[0].k, k_before) and caches[0].lengths.tolist() == [4]
    assert caches[0].host_lengths == [4]


def test_generate_compiled_equals_eager():
    from gptoss.generate import generate
    model = Transformer.from_config(TINY, seed=10, dtype=torch.float32)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (7, 3)]
    eager = generate(model, prompts, 6)
    assert [len(o) for o in eager] == [6, 6]
    assert generate(model, prompts, 6, compile={"backend": "aot_eager"}) == eager


def test_generate_streams_tokens_and_stops_per_sequence():
    from gptoss.generate import generate
    model = Transformer.from_config(TINY, seed=16, dtype=torch.float32)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (5, 2, 9)]
    free = generate(model, prompts, 6)
    stop = free[1][2]  # sequence 1 stops on its third token; the others on it too if they emit it
    seen = []
    out = generate(model, prompts, 6, stop_tokens=[stop], on_token=lambda i, t: seen.append((i, t)))
    for i, (o, f) in enumerate(zip(out, free)):
        n = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:n]
        assert [t for j, t in seen if j == i] == o  # every token streamed once, in order
    assert len(out[1]) <= 3


def test_generate_continues_in_rewound_caches():
    """A conversation's pattern: generate, rewind the caches to a shared prefix, continue with
    another prompt; equal to generating from scratch. The sliding layers' caches are rings here
    (window 8, 64 slots for steps of up to 40 tokens, 200 positions)."""
    from gptoss.generate import generate
    model = Transformer.from_config(TINY, seed=17, dtype=torch.float32)
    caches = model.new_caches(1, 200, max_step=40)
    assert caches[0].ring and caches[0].max_rewind() == 64 - 8 + 1
    p1 = torch.randint(0, TINY.vocab_size, (30,)).tolist()
    out1 = generate(model, [p1], 8, caches=caches)
    assert out1 == generate(model, [p1], 8)
    assert caches[0].host_lengths == [30 + 8 - 1]  # the last token was never fed back
    p2 = p1 + out1[0][:5] + torch.randint(0, TINY.vocab_size, (20,)).tolist()
    for c in caches:
        c.rewind(35)  # keep p1 and the first 5 new tokens
    assert generate(model, [p2], 8, caches=caches) == generate(model, [p2], 8)
    with pytest.raises(ValueError, match="at most 57 tokens"):
        caches[0].rewind(caches[0].host_lengths[0] - 58)
    with pytest.raises(ValueError, match="extend what its cache holds"):
        generate(model, [p2[:10]], 2, caches=caches)
    with pytest.raises(ValueError, match="exceed max_step"):  # the rest must fit one step of the rings
        generate(model, [p2 + [1] * 60], 2, caches=caches)


def test_last_only_logits_equal_the_full_logits_at_the_last_tokens():
    model = Transformer.from_config(TINY, seed=14, dtype=torch.float32)
    lens = [11, 4]
    seqs, padded = _ragged_prompts(model, lens, 0)
    with torch.no_grad():
        full = model(padded)
        assert rel_err(model(padded, last_only=True), full[:, -1]) < 1e-6
        caches, ref_caches = model.new_caches(2, 16, max_step=11), model.new_caches(2, 16, max_step=11)
        last = model(padded, caches, advance=lens, last_only=True)
        ref = model(padded, ref_caches, advance=lens)
        assert last.shape == (2, TINY.vocab_size)
        for i, n in enumerate(lens):
            assert rel_err(last[i], ref[i, n - 1]) < 1e-6
        assert caches[0].host_lengths == lens
        with pytest.raises(ValueError, match="last_only"):
            model(padded, model.new_caches(2, 16, max_step=11), advance=[0, 4], last_only=True)


def test_generate_long_prompts_past_the_window():
    from gptoss.generate import generate
    model = Transformer.from_config(TINY, seed=15, dtype=torch.float32)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (70, 20)]  # > window and > 64 slots
    out = generate(model, prompts, 3)
    with torch.no_grad():  # greedy: each new token is the argmax of the full forward over the sequence so far
        for p, new in zip(prompts, out):
            seq = torch.tensor(p + new)[None]
            assert model(seq)[0, len(p) - 1:-1].argmax(-1).tolist() == new


def test_cuda_graph_decoder_needs_a_cuda_model():
    from gptoss import CUDAGraphDecoder
    model = Transformer.from_config(TINY, seed=11, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphDecoder(model, model.new_caches(1, 8))


def test_bf16_close_to_fp32():
    m32 = Transformer.from_config(TINY, seed=4, dtype=torch.float32)
    m16 = Transformer.from_config(TINY, seed=4, dtype=torch.bfloat16)
    tokens = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(m16(tokens), m32(tokens)) < 0.05


def test_mxfp4_checkpoint_equals_dequantized(tmp_path):
    model = Transformer.from_config(TINY, seed=5, mxfp4=True, dtype=torch.float32)
    model.save_checkpoint(str(tmp_path / "ckpt"), progress=False)
    kept = Transformer.from_checkpoint(str(tmp_path / "ckpt"), dtype=torch.float32, progress=False)
    dense = Transformer.from_checkpoint(str(tmp_path / "ckpt"), dtype=torch.float32, mxfp4="dequantize",
                                        progress=False)
    assert kept.block[0].mlp.mxfp4 and not dense.block[0].mlp.mxfp4
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        assert rel_err(kept(tokens), dense(tokens)) < 1e-5
        assert rel_err(kept(tokens), model(tokens)) == 0.0


def test_parameter_names_are_the_openai_checkpoint_names():
    from gptoss.checkpoint import expected_shapes
    for mxfp4 in (False, True):
        model = Transformer.from_config(TINY, mxfp4=mxfp4, dtype=torch.float32)
        names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert names == {k: tuple(s) for k, (s, _) in expected_shapes(TINY, mxfp4).items()}


# ------------------------------------------------------------------------ Hugging Face parity

transformers = pytest.importorskip("transformers")


def hf_tiny_model(cfg: ModelConfig, seed: int):
    hf_cfg = transformers.GptOssConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                          if k not in ("architectures", "model_type", "transformers_version")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # transformers leaves some parameters (sinks, biases) at init values
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def test_parity_with_transformers_from_hf_checkpoint(tmp_path):
    hf = hf_tiny_model(TINY, seed=6)
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_checkpoint(str(tmp_path / "hf"), dtype=torch.float32, progress=False)
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert rel_err(ours(tokens), expected) < 1e-4
        caches = ours.new_caches(2, 32)
        steps = [ours(tokens[:, :7], caches)] + [ours(tokens[:, s:s + 1], caches) for s in range(7, 20)]
        assert rel_err(torch.cat(steps, 1), expected) < 1e-4


def _with_visible_sinks_and_biases(model):
    """Biases (zero at init) and sinks redrawn at scale 0.5, so that both matter in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def test_parity_with_transformers_from_our_checkpoint(tmp_path):
    ours = _with_visible_sinks_and_biases(Transformer.from_config(TINY, seed=7, dtype=torch.float32))
    ours.save_checkpoint(str(tmp_path / "openai"), progress=False)
    from gptoss.cli import main as cli
    cli(["convert", str(tmp_path / "openai"), str(tmp_path / "hf"), "--layout", "hf", "-q"])
    hf = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, ours(tokens)) < 1e-4


def test_parity_with_transformers_mxfp4_hf_checkpoint(tmp_path):
    """MXFP4 experts against an independent decoder: our model with MXFP4 experts is saved in the
    OpenAI layout, converted by the CLI to the HF layout with the experts kept MXFP4 (the hub's
    gpt-oss format: `*_proj_blocks` / `*_proj_scales`, `quantization_config`), and loaded by
    transformers, which dequantizes them with its own code on a CPU. Same logits in fp32 (the
    dequantized values are exact there), so the nibble order, the scale bias and the tensor
    names and shapes agree with what transformers reads from the published checkpoints."""
    pytest.importorskip("accelerate", reason="transformers loads MXFP4 checkpoints through accelerate")
    ours = _with_visible_sinks_and_biases(Transformer.from_config(TINY, seed=8, mxfp4=True, dtype=torch.float32))
    ours.save_checkpoint(str(tmp_path / "openai"), progress=False)
    from gptoss.cli import main as cli
    cli(["convert", str(tmp_path / "openai"), str(tmp_path / "hf"), "--layout", "hf", "-q"])
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_config["quantization_config"]["quant_method"] == "mxfp4"
    hf = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    experts = hf.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32  # dequantized by transformers, not by us
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    loaded = Transformer.from_checkpoint(str(tmp_path / "hf"), dtype=torch.float32, progress=False)
    assert loaded.block[0].mlp.mxfp4  # kept MXFP4 on our side
    with torch.no_grad():
        expected = hf(tokens).logits
        assert rel_err(ours(tokens), expected) < 1e-5
        assert rel_err(loaded(tokens), expected) < 1e-5
