"""ModelConfig: presets, validation, and the OpenAI / Hugging Face config.json formats (spec §1.1,
§6.2 #5-#6). transformers 5.24 is the parity peer for the HF format; nothing is downloaded."""
import dataclasses
import json
import math
import os
import warnings

import pytest
import torch

from gptoss.config import FULL, OPENAI_FIELDS, PRESETS, SLIDING, ModelConfig, detect_config_format
from gptoss_ext import reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# original/config.json of gpt-oss-120b as the hub publishes it (spec §1.1; note the integer
# rope_theta / ntk values).
HUB_120B_OPENAI = {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
                   "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                   "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                   "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def hub_20b_hf():
    """config.json of gpt-oss-20b as the hub publishes it (transformers 4.55 era: rope_scaling,
    top-level rope_theta, OpenAI-named leftovers, MXFP4 quantization_config)."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(24)], "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }


# ------------------------------------------------------------------------------ presets

def test_presets_match_the_spec():
    assert ModelConfig.preset("gpt-oss-120b").to_openai_dict() == HUB_120B_OPENAI
    assert ModelConfig.preset("gpt-oss-20b").to_openai_dict() == {**HUB_120B_OPENAI, "num_hidden_layers": 24,
                                                                  "num_experts": 32}
    c = ModelConfig.preset("gpt-oss-20b")
    assert c.layer_types == tuple(SLIDING if i % 2 == 0 else FULL for i in range(24))
    assert [c.window(i) for i in range(4)] == [128, 0, 128, 0]
    assert c.max_position_embeddings == 131072 and c.qkv_dim == 5120 and c.q_per_kv == 8
    assert c.rms_norm_eps == 1e-5 and c.swiglu_alpha == 1.702
    assert set(PRESETS) >= {"gpt-oss-20b", "gpt-oss-120b", "notebook-demo", "tiny-test"}


def test_tiny_preset_has_every_feature_and_valid_yarn():
    c = ModelConfig.preset("tiny-test")
    assert (c.num_hidden_layers, c.vocab_size, c.hidden_size, c.intermediate_size) == (3, 1000, 64, 64)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 2, 16, 8)
    assert (c.num_experts, c.experts_per_token, c.max_position_embeddings) == (4, 2, 64)
    assert c.layer_types == (SLIDING, FULL, SLIDING)
    assert c.rope_scaling_factor == 4.0
    low, high = reference.yarn_low_high(c.head_dim, c.rope_theta, c.rope_scaling_factor, c.initial_context_length,
                                        c.rope_ntk_alpha, c.rope_ntk_beta)
    # a band of dims is blended, some keep the original frequency, some are fully interpolated
    assert 1 < low < 2 and 5 < high < 6
    inv, conc = reference.yarn_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor, c.initial_context_length,
                                        c.rope_ntk_alpha, c.rope_ntk_beta)
    base = 1.0 / c.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ratio = base / inv
    assert torch.allclose(ratio[:2], torch.ones(2, dtype=torch.float64)) and torch.allclose(ratio[6:], torch.full((2,), 4.0, dtype=torch.float64))
    assert ((ratio[2:6] > 1) & (ratio[2:6] < 4)).all()
    assert conc == pytest.approx(0.1 * math.log(4) + 1)


def test_preset_overrides_recompute_derived_fields():
    c = ModelConfig.preset("gpt-oss-20b", num_hidden_layers=3, rope_scaling_factor=8.0)
    assert c.layer_types == (SLIDING, FULL, SLIDING)
    assert c.max_position_embeddings == 4096 * 8
    assert ModelConfig.preset("tiny-test", sliding_window=0).layer_types == (FULL,) * 3
    with pytest.raises(KeyError, match="unknown preset 'nope'"):
        ModelConfig.preset("nope")


# ------------------------------------------------------------------------------ validation

def test_hidden_size_need_not_equal_heads_times_head_dim():
    c = ModelConfig.preset("gpt-oss-20b")
    assert c.hidden_size != c.num_attention_heads * c.head_dim  # 2880 vs 4096: valid for gpt-oss


@pytest.mark.parametrize("overrides, needle", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(layer_types=[SLIDING, FULL]), "layer_types"),
    (dict(layer_types=[SLIDING, FULL, "local"]), "layer_types"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(experts_per_token=5), "experts_per_token (5) must be <= num_experts (4)"),
    (dict(sliding_window=-1), "sliding_window must be >= 0"),
    (dict(sliding_window=0, layer_types=[SLIDING, FULL, SLIDING]), "sliding_window is 0"),
    (dict(rope_scaling_factor=0.5), "rope_scaling_factor must be >= 1"),
    (dict(rope_ntk_beta=0.01), "YaRN needs 0 < low < high"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers must be an integer"),
    (dict(vocab_size=True), "vocab_size must be an integer"),
    (dict(swiglu_limit=float("nan")), "swiglu_limit must be a finite number"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be an integer > 0"),
])
def test_invalid_configs_name_the_problem(overrides, needle):
    with pytest.raises(ValueError, match="invalid ModelConfig") as e:
        ModelConfig.preset("tiny-test", **overrides)
    assert needle in str(e.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError) as e:
        ModelConfig.preset("tiny-test", num_key_value_heads=3, head_dim=15, experts_per_token=9,
                           layer_types=[FULL])
    msg = str(e.value)
    for needle in ("num_key_value_heads (3)", "head_dim must be even", "experts_per_token (9)", "layer_types"):
        assert needle in msg


@pytest.mark.parametrize("kw", [
    dict(initial_context_length=16, rope_ntk_alpha=0.03125, rope_ntk_beta=0.5),
    dict(initial_context_length=4096, rope_ntk_alpha=1.0, rope_ntk_beta=32.0),
    dict(initial_context_length=16, rope_ntk_alpha=0.5, rope_ntk_beta=0.5),      # low == high
    dict(initial_context_length=16, rope_ntk_alpha=0.001, rope_ntk_beta=0.5),    # high too large
    dict(initial_context_length=16, rope_ntk_alpha=0.03125, rope_ntk_beta=4.0),  # low < 0
])
def test_yarn_validity_agrees_with_the_reference(kw):
    args = dict(head_dim=16, rope_theta=1000.0, rope_scaling_factor=4.0, **kw)
    try:
        reference.yarn_low_high(**args)
        ref_ok = True
    except ValueError:
        ref_ok = False
    try:
        ModelConfig.preset("tiny-test", **args)
        ours_ok = True
    except ValueError as e:
        assert "YaRN" in str(e)
        ours_ok = False
    assert ours_ok == ref_ok


# ------------------------------------------------------------------------------ OpenAI format

def test_openai_dict_round_trip():
    cfg = ModelConfig.from_openai_dict(HUB_120B_OPENAI)
    assert cfg == ModelConfig.preset("gpt-oss-120b")
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.rope_ntk_alpha, float)
    for name in ("tiny-test", "gpt-oss-20b", "notebook-demo"):
        c = ModelConfig.preset(name)
        d = c.to_openai_dict()
        assert list(d) == list(OPENAI_FIELDS)
        assert ModelConfig.from_openai_dict(json.loads(json.dumps(d))) == c


def test_openai_dict_missing_and_unknown_keys():
    d = dict(HUB_120B_OPENAI)
    del d["head_dim"], d["rope_theta"]
    d["rms_norm_eps"] = 1e-5
    d["bogus"] = 1
    with pytest.raises(ValueError) as e:
        ModelConfig.from_openai_dict(d)
    msg = str(e.value)
    assert "missing keys ['head_dim', 'rope_theta']" in msg and "unknown keys ['bogus', 'rms_norm_eps']" in msg


def test_openai_format_refuses_what_it_cannot_express():
    c = ModelConfig.preset("tiny-test", rms_norm_eps=1e-6, swiglu_alpha=1.5, layer_types=[FULL, SLIDING, FULL],
                           max_position_embeddings=32)
    with pytest.raises(ValueError) as e:
        c.to_openai_dict()
    for needle in ("rms_norm_eps=1e-06", "swiglu_alpha=1.5", "layer_types=", "max_position_embeddings=32"):
        assert needle in str(e.value)
    # no sliding window: the format says window 0 for every layer
    c0 = ModelConfig.preset("tiny-test", sliding_window=0)
    assert ModelConfig.from_openai_dict(c0.to_openai_dict()) == c0


# ------------------------------------------------------------------------------ HF format

def test_hub_hf_config_reads_as_the_20b_preset():
    assert ModelConfig.from_hf_dict(hub_20b_hf()) == ModelConfig.preset("gpt-oss-20b")


def test_hf_dict_round_trip_and_both_rope_forms():
    for name in ("tiny-test", "gpt-oss-120b", "notebook-demo"):
        c = ModelConfig.preset(name)
        d = json.loads(json.dumps(c.to_hf_dict()))
        assert "rope_parameters" in d and "rope_scaling" not in d and "rope_theta" not in d
        assert ModelConfig.from_hf_dict(d) == c
        # the hub's older form: rope_scaling without rope_theta, rope_theta at the top level
        old = dict(d)
        rope = old.pop("rope_parameters")
        old["rope_theta"] = rope.pop("rope_theta")
        old["rope_scaling"] = rope
        assert ModelConfig.from_hf_dict(old) == c
    c = ModelConfig.preset("tiny-test", sliding_window=0, rms_norm_eps=1e-6, swiglu_alpha=1.5, swiglu_limit=5.0,
                           layer_types=[FULL] * 3)
    d = c.to_hf_dict()
    assert d["sliding_window"] is None
    assert ModelConfig.from_hf_dict(d) == c


def test_hf_truncate_must_be_false():
    d = hub_20b_hf()
    d["rope_scaling"]["truncate"] = True
    with pytest.raises(ValueError, match="truncate=True"):
        ModelConfig.from_hf_dict(d)
    del d["rope_scaling"]["truncate"]
    with pytest.raises(ValueError, match="absent: transformers treats it as true"):
        ModelConfig.from_hf_dict(d)


def test_hf_factor_mapping():
    # explicit factor wins over max_position_embeddings / original (with a warning about transformers 4.x)
    d = hub_20b_hf()
    d["max_position_embeddings"] = 32768
    with pytest.warns(UserWarning, match="transformers 4.x would use the ratio 8"):
        c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling_factor == 32.0 and c.max_position_embeddings == 32768
    assert c.to_hf_dict()["max_position_embeddings"] == 32768
    # no factor: the ratio, as transformers computes it
    d = hub_20b_hf()
    del d["rope_scaling"]["factor"]
    d["max_position_embeddings"] = 65536
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling_factor == 16.0 and c.max_position_embeddings == 65536
    # consistent files give no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_hf_dict(hub_20b_hf())


def test_hf_rope_defaults_and_default_rope_type():
    d = hub_20b_hf()
    del d["rope_scaling"], d["rope_theta"]  # GptOssConfig's defaults: the gpt-oss YaRN settings
    assert ModelConfig.from_hf_dict(d) == ModelConfig.preset("gpt-oss-20b")
    d = hub_20b_hf()
    d["rope_scaling"] = {"rope_type": "default"}
    d["max_position_embeddings"] = 4096
    del d["initial_context_length"]
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling_factor == 1.0 and c.initial_context_length == 4096 and c.max_position_embeddings == 4096


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d.update(bogus=1, other=2), ["unknown keys ['bogus', 'other']"]),
    (lambda d: [d.pop("num_local_experts"), d.pop("head_dim")], ["missing keys ['head_dim', 'num_local_experts']"]),
    (lambda d: d.update(tie_word_embeddings=True), ["tie_word_embeddings must be false"]),
    (lambda d: d.update(attention_bias=False), ["attention_bias must be true"]),
    (lambda d: d.update(model_type="llama"), ["model_type must be 'gpt_oss'"]),
    (lambda d: d.update(experts_per_token=2), ["num_experts_per_tok=4 disagrees with experts_per_token=2"]),
    (lambda d: d.update(initial_context_length=8192), ["initial_context_length=8192 disagrees"]),
    (lambda d: d.update(quantization_config={"quant_method": "fp8"}), ["only quant_method 'mxfp4'"]),
    (lambda d: d["rope_scaling"].update(mscale=1.0), ["['mscale'] are not supported"]),
    (lambda d: d["rope_scaling"].update(attention_factor=1.0), ["attention_factor=1.0 differs"]),
    (lambda d: d["rope_scaling"].update(rope_type="linear"), ["rope_type 'linear' is not supported"]),
    (lambda d: d["rope_scaling"].pop("original_max_position_embeddings"),
     ["YaRN needs original_max_position_embeddings"]),
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 16.0}), ["rope_scaling['factor']=32.0 "
                                                                                 "disagrees"]),
    (lambda d: d.update(layer_types=[SLIDING] * 3), ["layer_types must list"]),
    (lambda d: d.update(num_key_value_heads=7), ["multiple of num_key_value_heads"]),
])
def test_hf_dict_errors_list_the_keys(edit, needles):
    d = hub_20b_hf()
    edit(d)
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict(d)
    for needle in needles:
        assert needle in str(e.value)


def test_hf_attention_factor_equal_to_concentration_is_accepted():
    d = hub_20b_hf()
    d["rope_scaling"]["attention_factor"] = 0.1 * math.log(32.0) + 1.0
    assert ModelConfig.from_hf_dict(d) == ModelConfig.preset("gpt-oss-20b")


# ------------------------------------------------------------------------------ files

def test_json_files_detect_the_format(tmp_path):
    c = ModelConfig.preset("tiny-test")
    (tmp_path / "a").mkdir()
    written = c.to_json(str(tmp_path / "a"))  # folder -> folder/config.json
    assert written == str(tmp_path / "a" / "config.json")
    assert detect_config_format(json.load(open(written))) == "openai"
    assert ModelConfig.from_json(str(tmp_path / "a")) == c
    c.to_json(str(tmp_path / "hf.json"), format="hf", mxfp4=True, dtype="bfloat16")
    d = json.load(open(tmp_path / "hf.json"))
    assert detect_config_format(d) == "hf" and d["quantization_config"]["quant_method"] == "mxfp4"
    assert d["dtype"] == "bfloat16"
    assert ModelConfig.from_json(str(tmp_path / "hf.json")) == c
    with pytest.raises(ValueError, match="format must be"):
        c.to_json(str(tmp_path / "x.json"), format="gguf")
    (tmp_path / "bad.json").write_text(json.dumps({**c.to_openai_dict(), "extra": 1}))
    with pytest.raises(ValueError, match=r"bad.json: OpenAI config.json: unknown keys \['extra'\]"):
        ModelConfig.from_json(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------------------ transformers parity

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["tiny-test", "gpt-oss-20b", "notebook-demo"])
def test_our_hf_config_is_what_transformers_writes_and_reads(tmp_path, name, transformers):
    c = ModelConfig.preset(name)
    ours = c.to_hf_dict()
    # transformers writing the same settings (config-only saves omit "architectures")
    kwargs = {k: v for k, v in ours.items() if k not in ("architectures", "model_type", "transformers_version")}
    transformers.GptOssConfig(**kwargs).save_pretrained(str(tmp_path / "theirs"))
    theirs = json.load(open(tmp_path / "theirs" / "config.json"))
    assert {k: v for k, v in ours.items() if k != "architectures"} == theirs
    assert ModelConfig.from_json(str(tmp_path / "theirs")) == c
    # transformers reading ours
    (tmp_path / "ours").mkdir()
    c.to_json(str(tmp_path / "ours"), format="hf")
    hc = transformers.GptOssConfig.from_pretrained(str(tmp_path / "ours"))
    assert (hc.num_hidden_layers, hc.num_local_experts, hc.num_experts_per_tok, hc.vocab_size, hc.hidden_size,
            hc.intermediate_size, hc.head_dim, hc.num_attention_heads, hc.num_key_value_heads, hc.sliding_window,
            hc.rms_norm_eps, hc.swiglu_limit, hc.swiglu_alpha, hc.max_position_embeddings) == (
        c.num_hidden_layers, c.num_experts, c.experts_per_token, c.vocab_size, c.hidden_size, c.intermediate_size,
        c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.sliding_window, c.rms_norm_eps, c.swiglu_limit,
        c.swiglu_alpha, c.max_position_embeddings)
    assert list(hc.layer_types) == list(c.layer_types)
    assert ModelConfig.from_hf_dict(hc.to_dict()) == c


@pytest.mark.parametrize("name", ["tiny-test", "gpt-oss-20b"])
def test_transformers_yarn_from_our_hf_config_matches_the_reference(tmp_path, name, transformers):
    """The mapping (beta_fast = rope_ntk_beta, beta_slow = rope_ntk_alpha, truncate false, factor)
    makes transformers compute the reference's inv_freq and concentration."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = ModelConfig.preset(name)
    c.to_json(str(tmp_path), format="hf")
    hc = transformers.GptOssConfig.from_pretrained(str(tmp_path))
    inv_hf, att = ROPE_INIT_FUNCTIONS["yarn"](hc, "cpu")
    inv_ref, conc = reference.yarn_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor,
                                            c.initial_context_length, c.rope_ntk_alpha, c.rope_ntk_beta,
                                            dtype=torch.float32)
    torch.testing.assert_close(inv_hf, inv_ref, rtol=2e-6, atol=0)
    assert att == pytest.approx(conc, rel=1e-12)
    # and the same file with truncation would not match: why we refuse truncate true
    d = json.load(open(tmp_path / "config.json"))
    d["rope_parameters"]["truncate"] = True
    hc_t = transformers.GptOssConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type",
                                                                                 "transformers_version")})
    inv_t, _ = ROPE_INIT_FUNCTIONS["yarn"](hc_t, "cpu")
    assert not torch.allclose(inv_t, inv_ref, rtol=1e-3)


def test_dataclass_stays_frozen_and_hashable():
    c = ModelConfig.preset("tiny-test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_experts = 3
    assert hash(c) == hash(ModelConfig.preset("tiny-test"))


def test_transformers_reading_the_hub_config_agrees_with_us(transformers):
    d = hub_20b_hf()
    hc = transformers.GptOssConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type",
                                                                             "transformers_version")})
    assert hc.rope_parameters["factor"] == 32.0 and hc.rope_parameters["rope_theta"] == 150000
    assert ModelConfig.from_hf_dict(hc.to_dict()) == ModelConfig.from_hf_dict(d) == ModelConfig.preset("gpt-oss-20b")
