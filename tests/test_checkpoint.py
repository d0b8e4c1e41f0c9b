"""Checkpoints (spec §3): expected shapes and counts, OpenAI <-> HF layout conversion, safetensors
load/save, the convert CLI, and parity with transformers 5.24's GptOssForCausalLM layout.
Everything is built locally from random tensors; nothing is downloaded."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss import cli
from gptoss.checkpoint import (FLOAT, UINT8, checkpoint_nbytes, expected_shapes, hf_expected_shapes, hf_to_openai,
                               load_state_dict, openai_to_hf, parameter_count, parse_size, save_checkpoint)
from gptoss.config import ModelConfig
from gptoss_ext import reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ModelConfig.preset("tiny-test")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_state_dict(cfg=TINY, mxfp4=False, dtype=torch.bfloat16):
    """Random tensors for every parameter (OpenAI names); MXFP4 expert weights via the reference
    quantizer of random dense weights."""
    sd = {}
    for name, (shape, _) in expected_shapes(cfg, mxfp4=False).items():
        t = torch.randn(shape)
        if mxfp4 and name.endswith(("mlp1_weight", "mlp2_weight")):
            sd[name + ".blocks"], sd[name + ".scales"] = reference.mxfp4_quantize(t)
        else:
            sd[name] = t.to(dtype)
    return {n: sd[n] for n in expected_shapes(cfg, mxfp4)}


def assert_same(a, b):
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n], b[n]), n


# ------------------------------------------------------------------------------ shapes and counts

def test_parameter_and_byte_counts_match_the_spec():
    c20, c120 = ModelConfig.preset("gpt-oss-20b"), ModelConfig.preset("gpt-oss-120b")
    assert parameter_count(c20) == 20_914_757_184
    assert parameter_count(c120) == 116_829_156_672
    assert checkpoint_nbytes(c20, mxfp4=True) == 13_761_264_768
    assert checkpoint_nbytes(c120, mxfp4=True) == 65_248_815_744

    def count(cfg, mxfp4):  # independently of the helpers, from expected_shapes
        elems = nbytes = 0
        for name, (shape, kind) in expected_shapes(cfg, mxfp4).items():
            n = 1
            for s in shape:
                n *= s
            # a .blocks byte holds 2 FP4 values; .scales add no parameters
            elems += 2 * n if name.endswith(".blocks") else (0 if name.endswith(".scales") else n)
            nbytes += n * (1 if kind == UINT8 else 2)
        return elems, nbytes
    assert count(c20, True) == (20_914_757_184, 13_761_264_768)
    assert count(c120, True) == (116_829_156_672, 65_248_815_744)
    assert count(c20, False) == (20_914_757_184, 2 * 20_914_757_184)


def test_expected_shapes_of_20b_follow_spec_table():
    s = expected_shapes(ModelConfig.preset("gpt-oss-20b"), mxfp4=True)
    assert s["embedding.weight"] == ((201088, 2880), FLOAT)
    assert s["block.0.attn.qkv.weight"] == ((5120, 2880), FLOAT)
    assert s["block.23.attn.sinks"] == ((64,), FLOAT)
    assert s["block.5.attn.out.weight"] == ((2880, 4096), FLOAT)
    assert s["block.0.mlp.gate.weight"] == ((32, 2880), FLOAT)
    assert s["block.0.mlp.mlp1_weight.blocks"] == ((32, 5760, 90, 16), UINT8)
    assert s["block.0.mlp.mlp1_weight.scales"] == ((32, 5760, 90), UINT8)
    assert s["block.0.mlp.mlp2_weight.blocks"] == ((32, 2880, 90, 16), UINT8)
    assert s["block.0.mlp.mlp2_bias"] == ((32, 2880), FLOAT)
    assert s["unembedding.weight"] == ((201088, 2880), FLOAT)
    assert len(s) == 2 + 1 + 24 * 15 and "block.24.attn.sinks" not in s
    dense = expected_shapes(ModelConfig.preset("gpt-oss-20b"), mxfp4=False)
    assert dense["block.0.mlp.mlp1_weight"] == ((32, 5760, 2880), FLOAT)
    assert dense["block.0.mlp.mlp2_weight"] == ((32, 2880, 2880), FLOAT)
    hf = hf_expected_shapes(ModelConfig.preset("gpt-oss-20b"), mxfp4=False)
    assert hf["model.layers.0.self_attn.q_proj.weight"] == ((4096, 2880), FLOAT)
    assert hf["model.layers.0.self_attn.k_proj.bias"] == ((512,), FLOAT)
    assert hf["model.layers.0.mlp.experts.gate_up_proj"] == ((32, 2880, 5760), FLOAT)
    assert hf["model.layers.0.mlp.experts.down_proj"] == ((32, 2880, 2880), FLOAT)
    with pytest.raises(ValueError, match="multiples of 32"):
        expected_shapes(ModelConfig.preset("tiny-test", hidden_size=48), mxfp4=True)


# ------------------------------------------------------------------------------ layout conversion

@pytest.mark.parametrize("mxfp4", [False, True])
def test_openai_hf_openai_round_trip_is_bit_exact(mxfp4):
    sd = random_state_dict(mxfp4=mxfp4)
    hf = openai_to_hf(sd, TINY)
    assert {n: (tuple(t.shape), UINT8 if t.dtype == torch.uint8 else FLOAT) for n, t in hf.items()} == \
        hf_expected_shapes(TINY, mxfp4)
    p = "model.layers.1."
    q, kv = 4 * 16, 2 * 16
    qkv = sd["block.1.attn.qkv.weight"]
    assert torch.equal(hf[p + "self_attn.q_proj.weight"], qkv[:q])
    assert torch.equal(hf[p + "self_attn.k_proj.weight"], qkv[q:q + kv])
    assert torch.equal(hf[p + "self_attn.v_proj.weight"], qkv[q + kv:])
    assert torch.equal(hf[p + "self_attn.v_proj.bias"], sd["block.1.attn.qkv.bias"][q + kv:])
    if mxfp4:  # blocks/scales are copied byte for byte
        assert torch.equal(hf[p + "mlp.experts.gate_up_proj_blocks"], sd["block.1.mlp.mlp1_weight.blocks"])
        assert torch.equal(hf[p + "mlp.experts.down_proj_scales"], sd["block.1.mlp.mlp2_weight.scales"])
    else:  # dense experts transposed; the gate/up interleave (rows of mlp1) is kept
        assert torch.equal(hf[p + "mlp.experts.gate_up_proj"], sd["block.1.mlp.mlp1_weight"].transpose(1, 2))
        assert torch.equal(hf[p + "mlp.experts.down_proj"], sd["block.1.mlp.mlp2_weight"].transpose(1, 2))
    assert torch.equal(hf["lm_head.weight"], sd["unembedding.weight"])
    assert_same(hf_to_openai(hf, TINY), sd)


# ------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("mxfp4", [False, True])
@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_save_load_round_trip(tmp_path, layout, mxfp4):
    sd = random_state_dict(mxfp4=mxfp4)
    files = save_checkpoint(sd, TINY, str(tmp_path), layout=layout, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert len(files) == 2
    conf = json.load(open(tmp_path / "config.json"))
    assert ("model_type" in conf) == (layout == "hf")
    if layout == "hf":
        assert ("quantization_config" in conf) == mxfp4 and conf["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert names == set((hf_expected_shapes if layout == "hf" else expected_shapes)(TINY, mxfp4))
    cfg, loaded = load_state_dict(str(tmp_path), progress=False)
    assert cfg == TINY
    assert_same(loaded, sd)


def test_openai_to_hf_to_openai_through_files(tmp_path):
    sd = random_state_dict(mxfp4=True)
    save_checkpoint(sd, TINY, str(tmp_path / "a"), layout="openai", progress=False)
    assert cli.main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--layout", "hf", "-q"]) == 0
    assert cli.main(["convert", str(tmp_path / "b"), str(tmp_path / "c"), "--layout", "openai", "-q"]) == 0
    a, c = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    assert set(a) == set(c) and all(torch.equal(a[n], c[n]) and a[n].dtype == c[n].dtype for n in a)
    assert json.load(open(tmp_path / "a" / "config.json")) == json.load(open(tmp_path / "c" / "config.json"))


def test_sharded_hf_checkpoint_with_index(tmp_path):
    sd = random_state_dict(mxfp4=False)
    # ~20 KB shards: q/k/v of one layer and their neighbours land in different files
    save_checkpoint(sd, TINY, str(tmp_path), layout="hf", max_shard_bytes=20_000, progress=False)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(hf_expected_shapes(TINY, False))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for shard in shards:
        assert os.path.getsize(tmp_path / shard) < 20_000 + 4096 or len(load_file(str(tmp_path / shard))) == 1
    _, loaded = load_state_dict(str(tmp_path), progress=False)
    assert_same(loaded, sd)
    # the index must agree with the shards
    index["weight_map"]["model.norm.weight"] = shards[0] if index["weight_map"]["model.norm.weight"] != shards[0] \
        else shards[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_state_dict(str(tmp_path), progress=False)


def test_load_options_dtype_dequantize_device(tmp_path):
    sd = random_state_dict(mxfp4=True)
    save_checkpoint(sd, TINY, str(tmp_path), layout="hf", progress=False)
    _, f32 = load_state_dict(str(tmp_path), dtype=torch.float32, progress=False)
    assert f32["block.0.mlp.mlp1_weight.blocks"].dtype == torch.uint8
    assert torch.equal(f32["block.0.mlp.mlp1_weight.blocks"], sd["block.0.mlp.mlp1_weight.blocks"])
    assert f32["embedding.weight"].dtype == torch.float32
    assert torch.equal(f32["embedding.weight"], sd["embedding.weight"].float())

    _, deq = load_state_dict(str(tmp_path), mxfp4="dequantize", progress=False)
    assert list(deq) == list(expected_shapes(TINY, mxfp4=False))
    for n in range(TINY.num_hidden_layers):
        for w in ("mlp1_weight", "mlp2_weight"):
            name = f"block.{n}.mlp.{w}"
            want = reference.mxfp4_dequantize(sd[name + ".blocks"], sd[name + ".scales"], torch.bfloat16)
            assert deq[name].dtype == torch.bfloat16 and torch.equal(deq[name], want)
    _, deq32 = load_state_dict(str(tmp_path), mxfp4="dequantize", dtype=torch.float32, progress=False)
    assert deq32["block.2.mlp.mlp2_weight"].dtype == torch.float32
    assert torch.equal(deq32["block.2.mlp.mlp2_weight"], deq["block.2.mlp.mlp2_weight"].float())
    with pytest.raises(ValueError, match="mxfp4 must be"):
        load_state_dict(str(tmp_path), mxfp4="drop")
    _, meta = load_state_dict(str(tmp_path), device="meta", progress=False)
    assert meta["norm.scale"].is_meta


def test_original_subfolder_and_preference(tmp_path):
    sd_hf, sd_oa = random_state_dict(mxfp4=True), random_state_dict(mxfp4=True)
    save_checkpoint(sd_oa, TINY, str(tmp_path / "original"), layout="openai", progress=False)
    (tmp_path / "README.md").write_text("only a readme at the root")
    _, loaded = load_state_dict(str(tmp_path), progress=False)
    assert_same(loaded, sd_oa)
    # an HF checkpoint at the root is what the user pointed at
    save_checkpoint(sd_hf, TINY, str(tmp_path), layout="hf", progress=False)
    _, loaded = load_state_dict(str(tmp_path), progress=False)
    assert_same(loaded, sd_hf)
    _, loaded = load_state_dict(str(tmp_path / "original"), progress=False)
    assert_same(loaded, sd_oa)


class _Trap:
    """Unpickling this writes a marker file (stands in for arbitrary code in a pickle)."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"
    trap = _Trap()
    trap.marker = str(marker)
    ckpt = tmp_path / "ckpt"
    sd = random_state_dict()
    save_checkpoint(sd, TINY, str(ckpt), layout="hf", progress=False)
    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth"):
        (ckpt / name).write_bytes(pickle.dumps(trap))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    _, loaded = load_state_dict(str(ckpt), progress=False)
    assert_same(loaded, sd)
    assert not marker.exists()
    # a folder with only pickles is refused, not loaded
    only = tmp_path / "only"
    only.mkdir()
    (only / "pytorch_model.bin").write_bytes(pickle.dumps(trap))
    (only / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_state_dict(str(only), progress=False)
    assert not marker.exists()


def test_tensor_errors_are_listed_together(tmp_path):
    sd = random_state_dict(mxfp4=True)
    save_checkpoint(sd, TINY, str(tmp_path), layout="openai", progress=False)
    bad = dict(sd)
    del bad["block.1.attn.sinks"], bad["norm.scale"]
    bad["block.3.attn.sinks"] = torch.zeros(4, dtype=torch.bfloat16)
    bad["extra.thing"] = torch.zeros(1)
    bad["block.0.attn.qkv.bias"] = torch.zeros(129, dtype=torch.bfloat16)
    bad["block.2.mlp.mlp2_weight.scales"] = bad["block.2.mlp.mlp2_weight.scales"].float()
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_state_dict(str(tmp_path), progress=False)
    msg = str(e.value)
    assert "2 missing: block.1.attn.sinks, norm.scale" in msg
    assert "2 unexpected: block.3.attn.sinks, extra.thing" in msg
    assert "block.0.attn.qkv.bias: expected [128] float, got [129] float" in msg
    assert "block.2.mlp.mlp2_weight.scales: expected [4, 64, 2] uint8, got [4, 64, 2] float" in msg
    # the same checks guard save_checkpoint and the in-memory conversions
    with pytest.raises(ValueError, match="1 missing: block.1.attn.sinks"):
        save_checkpoint({k: v for k, v in sd.items() if k != "block.1.attn.sinks"}, TINY, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="1 unexpected: bogus"):
        openai_to_hf({**sd, "bogus": torch.zeros(1)}, TINY)
    # a config that does not fit the tensors (wrong expert count) is reported the same way
    save_checkpoint(sd, TINY, str(tmp_path / "y"), layout="hf", progress=False)
    ModelConfig.preset("tiny-test", num_experts=8).to_json(str(tmp_path / "y"), format="hf")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.router.weight: expected \[8, 64\] float, got \[4, 64\]"):
        load_state_dict(str(tmp_path / "y"), progress=False)


def test_layout_detection_errors(tmp_path):
    TINY.to_json(str(tmp_path), format="openai")
    save_file({"embedding.weight": torch.zeros(2, 2), "model.norm.weight": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="mix the HF layout"):
        load_state_dict(str(tmp_path), progress=False)
    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="neither the OpenAI nor the HF"):
        load_state_dict(str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_state_dict(str(tmp_path / "nope"), progress=False)


def test_save_refuses_to_overwrite_and_to_misrepresent(tmp_path):
    sd = random_state_dict()
    save_checkpoint(sd, TINY, str(tmp_path), layout="hf", max_shard_bytes=50_000, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(sd, TINY, str(tmp_path), layout="openai", progress=False)
    save_checkpoint(sd, TINY, str(tmp_path), layout="openai", overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # old shards and index gone
    cfg = ModelConfig.preset("tiny-test", rms_norm_eps=1e-6)
    with pytest.raises(ValueError, match="rms_norm_eps"):
        save_checkpoint(sd, cfg, str(tmp_path / "new"), layout="openai", progress=False)
    assert not (tmp_path / "new").exists() or not os.listdir(tmp_path / "new")


def test_cli(tmp_path, capsys):
    sd = random_state_dict(mxfp4=True)
    save_checkpoint(sd, TINY, str(tmp_path / "src"), layout="openai", progress=False)
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dense"), "--layout", "hf", "--dequantize",
                     "--dtype", "fp32", "--max-shard-size", "100KB", "-q"]) == 0
    index = json.load(open(tmp_path / "dense" / "model.safetensors.index.json"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in index["weight_map"]
    cfg, dense = load_state_dict(str(tmp_path / "dense"), progress=False)
    assert cfg == TINY and dense["block.1.mlp.mlp1_weight"].dtype == torch.float32
    assert torch.equal(dense["block.1.mlp.mlp1_weight"],
                       reference.mxfp4_dequantize(sd["block.1.mlp.mlp1_weight.blocks"],
                                                  sd["block.1.mlp.mlp1_weight.scales"], torch.float32))
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dense"), "--layout", "hf", "-q"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert parse_size("100KB") == 100_000 and parse_size("4GiB") == 4 * 2**30 and parse_size("123") == 123
    # the module entry point, as a separate process
    r = subprocess.run([sys.executable, "-m", "gptoss.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "out"),
                        "--layout", "openai", "-q"], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 1 and "checkpoint folder not found" in r.stderr, r.stderr


def test_console_script_is_registered():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["gptoss"] == "gptoss.cli:main"


# ------------------------------------------------------------------------------ transformers parity

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _hf_model(transformers, cfg):
    hc = transformers.GptOssConfig.from_dict(cfg.to_hf_dict())
    model = transformers.GptOssForCausalLM(hc).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_transformers_model_loads_with_our_loader(tmp_path, transformers):
    model = _hf_model(transformers, TINY)
    model.save_pretrained(str(tmp_path / "m"))
    cfg, sd = load_state_dict(str(tmp_path / "m"), progress=False)
    assert cfg == TINY
    # transformers' own config.json for a saved model is what we write for the same model
    assert json.load(open(tmp_path / "m" / "config.json")) == TINY.to_hf_dict(dtype="float32")
    P = {n: p.detach() for n, p in model.named_parameters()}
    assert len(P) == len(sd) + 4 * TINY.num_hidden_layers  # 3 q/k/v weights and 3 biases -> 2 fused
    for n in range(TINY.num_hidden_layers):
        a, m, p = f"block.{n}.attn.", f"block.{n}.mlp.", f"model.layers.{n}."
        for x in ("weight", "bias"):
            fused = torch.cat([P[p + f"self_attn.{y}_proj.{x}"] for y in "qkv"])
            assert torch.equal(sd[a + f"qkv.{x}"], fused)
            assert torch.equal(sd[a + f"out.{x}"], P[p + f"self_attn.o_proj.{x}"])
            assert torch.equal(sd[m + f"gate.{x}"], P[p + f"mlp.router.{x}"])
        assert torch.equal(sd[a + "norm.scale"], P[p + "input_layernorm.weight"])
        assert torch.equal(sd[a + "sinks"], P[p + "self_attn.sinks"])
        assert torch.equal(sd[m + "norm.scale"], P[p + "post_attention_layernorm.weight"])
        assert torch.equal(sd[m + "mlp1_weight"], P[p + "mlp.experts.gate_up_proj"].transpose(1, 2))
        assert torch.equal(sd[m + "mlp1_bias"], P[p + "mlp.experts.gate_up_proj_bias"])
        assert torch.equal(sd[m + "mlp2_weight"], P[p + "mlp.experts.down_proj"].transpose(1, 2))
        assert torch.equal(sd[m + "mlp2_bias"], P[p + "mlp.experts.down_proj_bias"])
    assert torch.equal(sd["embedding.weight"], P["model.embed_tokens.weight"])
    assert torch.equal(sd["norm.scale"], P["model.norm.weight"])
    assert torch.equal(sd["unembedding.weight"], P["lm_head.weight"])
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_our_hf_checkpoint_loads_in_transformers(tmp_path, transformers):
    sd = random_state_dict(dtype=torch.float32)
    save_checkpoint(sd, TINY, str(tmp_path), layout="hf", max_shard_bytes=200_000, progress=False)
    model, info = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    P = {n: p.detach() for n, p in model.named_parameters()}
    hf = openai_to_hf(sd, TINY)
    assert set(P) == set(hf)
    for n, t in hf.items():
        assert torch.equal(P[n], t), n
    p = "model.layers.2."  # spot checks written out, independent of openai_to_hf
    assert torch.equal(P[p + "self_attn.k_proj.weight"], sd["block.2.attn.qkv.weight"][64:96])
    assert torch.equal(P[p + "self_attn.v_proj.bias"], sd["block.2.attn.qkv.bias"][96:])
    assert torch.equal(P[p + "mlp.experts.gate_up_proj"], sd["block.2.mlp.mlp1_weight"].transpose(1, 2))
    assert torch.equal(P[p + "mlp.experts.down_proj"], sd["block.2.mlp.mlp2_weight"].transpose(1, 2))
