"""Checkpoints (spec §3): parameter names and shapes, OpenAI <-> Hugging Face layout conversion,
and safetensors loading/saving.

Our parameter names are the OpenAI checkpoint names (spec §3.1). Dense expert weights are
[E, 2I, d] (mlp1, rows interleaved gate/up) and [E, d, I] (mlp2), as for nn.Linear; MXFP4 expert
weights are `<name>.blocks` [E, rows, cols/32, 16] uint8 and `<name>.scales` [E, rows, cols/32]
uint8 (spec §3.2). Every other tensor is floating point (bf16 in the released checkpoints).

The HF layout (spec §3.3) differs by names, by split q/k/v projections and by transposed dense
expert weights (gate_up_proj [E, d, 2I], down_proj [E, I, d]); MXFP4 blocks/scales and the
gate/up interleave are the same bytes in both.

Only safetensors files are ever read (pickle-based *.bin / *.pt files are ignored: loading them
can run arbitrary code).
"""
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ModelConfig, read_config_file

FLOAT = "float"  # any floating dtype (bf16, f16, f32, f64)
UINT8 = "uint8"
Shape = Tuple[int, ...]
Expected = Dict[str, Tuple[Shape, str]]

_SAFETENSORS_FLOAT = {"BF16", "F16", "F32", "F64"}
_HF_INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------ names and shapes

def expected_shapes(cfg: ModelConfig, mxfp4: bool) -> Expected:
    """Every parameter of the model in the OpenAI layout: name -> (shape, FLOAT | UINT8), in
    checkpoint order (embedding, blocks 0..n-1, final norm, unembedding).

    mxfp4=True lists the expert weights as `.blocks`/`.scales` (needs hidden_size and
    intermediate_size to be multiples of 32); False lists them dense.
    """
    d, E, I, V = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    if mxfp4 and (d % 32 or I % 32):
        raise ValueError(f"MXFP4 expert weights need hidden_size ({d}) and intermediate_size ({I}) to be "
                         f"multiples of 32")
    o_cols = cfg.num_attention_heads * cfg.head_dim
    out: Expected = {"embedding.weight": ((V, d), FLOAT)}
    for n in range(cfg.num_hidden_layers):
        a, m = f"block.{n}.attn.", f"block.{n}.mlp."
        out[a + "norm.scale"] = ((d,), FLOAT)
        out[a + "qkv.weight"] = ((cfg.qkv_dim, d), FLOAT)
        out[a + "qkv.bias"] = ((cfg.qkv_dim,), FLOAT)
        out[a + "sinks"] = ((cfg.num_attention_heads,), FLOAT)
        out[a + "out.weight"] = ((d, o_cols), FLOAT)
        out[a + "out.bias"] = ((d,), FLOAT)
        out[m + "norm.scale"] = ((d,), FLOAT)
        out[m + "gate.weight"] = ((E, d), FLOAT)
        out[m + "gate.bias"] = ((E,), FLOAT)
        for w, rows, cols in (("mlp1", 2 * I, d), ("mlp2", d, I)):
            if mxfp4:
                out[m + f"{w}_weight.blocks"] = ((E, rows, cols // 32, 16), UINT8)
                out[m + f"{w}_weight.scales"] = ((E, rows, cols // 32), UINT8)
            else:
                out[m + f"{w}_weight"] = ((E, rows, cols), FLOAT)
            out[m + f"{w}_bias"] = ((E, rows), FLOAT)
    out["norm.scale"] = ((d,), FLOAT)
    out["unembedding.weight"] = ((V, d), FLOAT)
    return out


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_count(cfg: ModelConfig) -> int:
    """Number of model parameters (dense-equivalent expert weights), spec §1.2."""
    return sum(_numel(shape) for shape, _ in expected_shapes(cfg, mxfp4=False).values())


def checkpoint_nbytes(cfg: ModelConfig, mxfp4: bool = True, float_bytes: int = 2) -> int:
    """Tensor bytes of a checkpoint: `float_bytes` per float element (2 = bf16), 1 per uint8."""
    return sum(_numel(shape) * (1 if kind == UINT8 else float_bytes)
               for shape, kind in expected_shapes(cfg, mxfp4).values())


def is_mxfp4_names(names: Iterable[str]) -> bool:
    """Whether a set of tensor names (either layout) holds MXFP4 expert weights."""
    return any(n.endswith((".blocks", ".scales", "_blocks", "_scales")) for n in names)


# ------------------------------------------------------------------------------ layout rules

@dataclass(frozen=True)
class _Rule:
    """One of our tensors and the HF tensors it corresponds to.
    op: "same" (one tensor, same shape), "rows" (ours = cat of theirs along dim 0, row counts
    `split`), "transpose" (ours = theirs with the last two dims swapped)."""
    ours: str
    theirs: Tuple[str, ...]
    op: str
    split: Tuple[int, ...] = ()


def _hf_rules(cfg: ModelConfig, mxfp4: bool) -> List[_Rule]:
    """The HF counterpart of every name of expected_shapes(cfg, mxfp4), in the same order (spec §3.3)."""
    qkv_split = (cfg.num_attention_heads * cfg.head_dim,) + (cfg.num_key_value_heads * cfg.head_dim,) * 2
    rules = [_Rule("embedding.weight", ("model.embed_tokens.weight",), "same")]
    for n in range(cfg.num_hidden_layers):
        a, m, p = f"block.{n}.attn.", f"block.{n}.mlp.", f"model.layers.{n}."
        rules += [
            _Rule(a + "norm.scale", (p + "input_layernorm.weight",), "same"),
            _Rule(a + "qkv.weight", tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), "rows", qkv_split),
            _Rule(a + "qkv.bias", tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"), "rows", qkv_split),
            _Rule(a + "sinks", (p + "self_attn.sinks",), "same"),
            _Rule(a + "out.weight", (p + "self_attn.o_proj.weight",), "same"),
            _Rule(a + "out.bias", (p + "self_attn.o_proj.bias",), "same"),
            _Rule(m + "norm.scale", (p + "post_attention_layernorm.weight",), "same"),
            _Rule(m + "gate.weight", (p + "mlp.router.weight",), "same"),
            _Rule(m + "gate.bias", (p + "mlp.router.bias",), "same"),
        ]
        for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            e = p + "mlp.experts." + theirs
            if mxfp4:
                rules += [_Rule(m + f"{ours}_weight.blocks", (e + "_blocks",), "same"),
                          _Rule(m + f"{ours}_weight.scales", (e + "_scales",), "same")]
            else:
                rules.append(_Rule(m + f"{ours}_weight", (e,), "transpose"))
            rules.append(_Rule(m + f"{ours}_bias", (e + "_bias",), "same"))
    rules += [_Rule("norm.scale", ("model.norm.weight",), "same"),
              _Rule("unembedding.weight", ("lm_head.weight",), "same")]
    return rules


def _hf_shapes(rule: _Rule, shape: Shape) -> List[Shape]:
    if rule.op == "rows":
        return [(r,) + tuple(shape[1:]) for r in rule.split]
    if rule.op == "transpose":
        return [tuple(shape[:-2]) + (shape[-1], shape[-2])]
    return [shape]


def hf_expected_shapes(cfg: ModelConfig, mxfp4: bool) -> Expected:
    """expected_shapes in the HF layout (HF names and shapes)."""
    ours = expected_shapes(cfg, mxfp4)
    out: Expected = {}
    for rule in _hf_rules(cfg, mxfp4):
        shape, kind = ours[rule.ours]
        for name, s in zip(rule.theirs, _hf_shapes(rule, shape)):
            out[name] = (s, kind)
    return out


def _to_ours(rule: _Rule, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if rule.op == "rows":
        return torch.cat(list(tensors), dim=0)
    if rule.op == "transpose":
        return tensors[0].transpose(-1, -2).contiguous()
    return tensors[0]


def _to_theirs(rule: _Rule, t: torch.Tensor) -> List[torch.Tensor]:
    if rule.op == "rows":
        # clone: each part gets its own storage (safetensors refuses tensors that share one)
        return [part.clone() for part in torch.split(t, list(rule.split), dim=0)]
    if rule.op == "transpose":
        return [t.transpose(-1, -2).contiguous()]
    return [t]


def _kind_of_dtype(dtype: torch.dtype) -> str:
    return UINT8 if dtype == torch.uint8 else (FLOAT if dtype.is_floating_point else str(dtype))


def _check_tensors(found: Dict[str, Tuple[Shape, str]], expected: Expected, what: str) -> None:
    """One ValueError listing every missing, unexpected and misshapen (or wrong-dtype) tensor."""
    missing = [n for n in expected if n not in found]
    unexpected = sorted(n for n in found if n not in expected)
    bad = [f"{n}: expected {list(expected[n][0])} {expected[n][1]}, got {list(found[n][0])} {found[n][1]}"
           for n in expected if n in found and (tuple(found[n][0]) != tuple(expected[n][0])
                                               or found[n][1] != expected[n][1])]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(missing))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected))
        if bad:
            parts.append(f"{len(bad)} with wrong shape or dtype: " + "; ".join(bad))
        raise ValueError(f"{what} does not match the config:\n  " + "\n  ".join(parts))


def _check_state_dict(state_dict: Dict[str, torch.Tensor], expected: Expected, what: str) -> None:
    _check_tensors({n: (tuple(t.shape), _kind_of_dtype(t.dtype)) for n, t in state_dict.items()}, expected, what)


def openai_to_hf(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our (OpenAI-named) state dict in the HF layout. Dense or MXFP4, as given."""
    mxfp4 = is_mxfp4_names(state_dict)
    _check_state_dict(state_dict, expected_shapes(cfg, mxfp4), "state dict")
    out = {}
    for rule in _hf_rules(cfg, mxfp4):
        out.update(zip(rule.theirs, _to_theirs(rule, state_dict[rule.ours])))
    return out


def hf_to_openai(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """An HF-layout state dict under our (OpenAI) names and layout."""
    mxfp4 = is_mxfp4_names(state_dict)
    _check_state_dict(state_dict, hf_expected_shapes(cfg, mxfp4), "HF state dict")
    return {rule.ours: _to_ours(rule, [state_dict[n] for n in rule.theirs]) for rule in _hf_rules(cfg, mxfp4)}


def detect_layout(names: Iterable[str]) -> str:
    """"openai" or "hf" from tensor names; ValueError for a mixture or neither."""
    names = list(names)
    hf = [n for n in names if n.startswith(("model.", "lm_head."))]
    oa = [n for n in names if n.startswith("block.") or n in ("embedding.weight", "norm.scale", "unembedding.weight")]
    if hf and oa:
        raise ValueError(f"tensor names mix the HF layout (e.g. {hf[0]}) and the OpenAI layout (e.g. {oa[0]})")
    if not hf and not oa:
        raise ValueError(f"tensor names are neither the OpenAI nor the HF gpt-oss layout (e.g. {names[:3]})")
    return "hf" if hf else "openai"


# ------------------------------------------------------------------------------ loading

def _find_weights_folder(path: str) -> str:
    """The folder whose safetensors are loaded: `path` itself if it holds any, else path/original."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}" + (
            " (a file; pass the folder holding config.json and the *.safetensors)" if os.path.exists(path) else ""))
    for folder in (path, os.path.join(path, "original")):
        if os.path.isdir(folder) and (glob.glob(os.path.join(folder, "*.safetensors"))
                                      or os.path.exists(os.path.join(folder, _HF_INDEX))):
            return folder
    raise FileNotFoundError(f"no *.safetensors in {path} or {os.path.join(path, 'original')} (pickle-based "
                            f"checkpoints such as *.bin/*.pt are never loaded)")


class _SafetensorsFolder:
    """The tensors of one folder's safetensors files (single, or sharded with an index json).
    Files are opened memory-mapped on demand and closed once every tensor read from them is
    done, so a loaded shard's pages are released as the next is read."""

    def __init__(self, folder: str):
        index = os.path.join(folder, _HF_INDEX)
        index_map = None
        if os.path.exists(index):
            with open(index) as f:
                index_map = json.load(f).get("weight_map")
            if not isinstance(index_map, dict):
                raise ValueError(f"{index}: no weight_map object")
            files = sorted(set(index_map.values()))
            absent = [f for f in files if not os.path.exists(os.path.join(folder, f))]
            if absent:
                raise FileNotFoundError(f"{index} names shard files that do not exist: {absent}")
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        self.folder, self.files = folder, files
        self.file_of: Dict[str, int] = {}
        self.meta: Dict[str, Tuple[Shape, str]] = {}
        duplicates = []
        for i, fname in enumerate(files):
            with safe_open(os.path.join(folder, fname), framework="pt") as f:
                for name in f.keys():
                    if name in self.file_of:
                        duplicates.append(f"{name} ({files[self.file_of[name]]}, {fname})")
                    self.file_of[name] = i
                    sl = f.get_slice(name)
                    dt = sl.get_dtype()
                    self.meta[name] = (tuple(sl.get_shape()),
                                       FLOAT if dt in _SAFETENSORS_FLOAT else ("uint8" if dt == "U8" else dt))
        if duplicates:
            raise ValueError(f"tensors stored in more than one file of {folder}: {duplicates}")
        if index_map is not None:
            wrong = [f"{n} (index: {index_map[n]})" for n in index_map
                     if n not in self.file_of or files[self.file_of[n]] != index_map[n]]
            unindexed = [n for n in self.file_of if n not in index_map]
            if wrong or unindexed:
                raise ValueError(f"{index} disagrees with the shard files: not found where indexed: {wrong}; "
                                 f"not in the index: {unindexed}")
        self._handles: Dict[int, object] = {}
        self._uses: Dict[int, int] = {}

    def plan_uses(self, names: Iterable[str]) -> None:
        for n in names:
            i = self.file_of[n]
            self._uses[i] = self._uses.get(i, 0) + 1

    def get(self, name: str) -> torch.Tensor:
        i = self.file_of[name]
        if i not in self._handles:
            h = safe_open(os.path.join(self.folder, self.files[i]), framework="pt", device="cpu")
            self._handles[i] = h.__enter__()
        t = self._handles[i].get_tensor(name)
        self._uses[i] -= 1
        if self._uses[i] == 0:
            self._close(i)
        return t

    def _close(self, i: int) -> None:
        h = self._handles.pop(i, None)
        if h is not None:
            h.__exit__(None, None, None)

    def close(self) -> None:
        for i in list(self._handles):
            self._close(i)


def _dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, R, G, 16] + [E, R, G] uint8 -> [E, R, 32 G] in dtype, one expert at a time (bounded
    temporary memory)."""
    from gptoss_ext.reference import mxfp4_dequantize
    out = torch.empty(blocks.shape[0], blocks.shape[1], 32 * blocks.shape[2], dtype=dtype)
    for e in range(blocks.shape[0]):
        out[e] = mxfp4_dequantize(blocks[e], scales[e], dtype)
    return out


def load_state_dict(path: str, device="cpu", dtype: Optional[torch.dtype] = None, mxfp4: str = "keep",
                    progress: bool = True) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Load a gpt-oss checkpoint folder into our names and layout.

    path: a folder with config.json (OpenAI or HF format) and *.safetensors (one file, or shards
      with model.safetensors.index.json) in the OpenAI or HF layout (detected from tensor names);
      if the folder has no safetensors, its original/ subfolder is used (the hub's layout).
    device: where the returned tensors live (each is moved as soon as it is converted).
    dtype: cast every floating tensor to this dtype (None: keep the stored dtypes).
    mxfp4: "keep" returns MXFP4 expert weights as uint8 `.blocks`/`.scales`; "dequantize" returns
      dense `mlp{1,2}_weight` in `dtype` (bf16 when dtype is None; the decoding is exact in bf16).
      A dense checkpoint is returned dense either way.
    Returns (config, state dict ordered as expected_shapes). Tensors are read memory-mapped and
    converted one at a time, so peak memory stays near the size of the result. On the CPU, tensors
    that need no conversion are copy-on-write mappings of the files (safetensors' zero-copy
    read): their pages are read when first touched, in-place changes never reach the files, but the
    files must not be rewritten in place (truncated) while such tensors are alive.
    One ValueError lists every missing, unexpected or misshapen tensor before any data is read.
    """
    if mxfp4 not in ("keep", "dequantize"):
        raise ValueError(f"mxfp4 must be 'keep' or 'dequantize', got {mxfp4!r}")
    folder = _find_weights_folder(path)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg, _ = read_config_file(folder)
    src = _SafetensorsFolder(folder)
    if not src.meta:
        raise ValueError(f"no tensors in the safetensors files of {folder}")
    layout = detect_layout(src.meta)
    quantized = is_mxfp4_names(src.meta)
    _check_tensors(src.meta, (hf_expected_shapes if layout == "hf" else expected_shapes)(cfg, quantized),
                   f"checkpoint {folder} ({layout} layout{', MXFP4' if quantized else ''})")

    # (our name, source names, conversion) for every output tensor
    plan: List[Tuple[str, Tuple[str, ...], Callable[[List[torch.Tensor]], torch.Tensor]]] = []
    if layout == "hf":
        for rule in _hf_rules(cfg, quantized):
            plan.append((rule.ours, rule.theirs, lambda ts, rule=rule: _to_ours(rule, ts)))
    else:
        for name in expected_shapes(cfg, quantized):
            plan.append((name, (name,), lambda ts: ts[0]))
    if quantized and mxfp4 == "dequantize":
        merged = []
        for i, (name, srcs, fn) in enumerate(plan):
            if name.endswith(".blocks"):
                scales_srcs, scales_fn = plan[i + 1][1], plan[i + 1][2]
                merged.append((name[:-len(".blocks")], srcs + scales_srcs,
                               lambda ts, fn=fn, sfn=scales_fn: _dequantize_experts(
                                   fn(ts[:1]), sfn(ts[1:]), dtype or torch.bfloat16)))
            elif not name.endswith(".scales"):
                merged.append((name, srcs, fn))
        plan = merged
    # shard by shard, in storage order within each
    position = {n: k for k, n in enumerate(src.meta)}
    plan.sort(key=lambda p: (src.file_of[p[1][0]], position[p[1][0]]))
    src.plan_uses(n for _, srcs, _ in plan for n in srcs)

    out: Dict[str, torch.Tensor] = {}
    try:
        for name, srcs, fn in tqdm(plan, desc=f"loading {os.path.basename(os.path.abspath(path))}", unit="tensor",
                                   disable=not progress):
            t = fn([src.get(n) for n in srcs])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t.to(device)
    finally:
        src.close()
    order = expected_shapes(cfg, quantized and mxfp4 == "keep")
    return cfg, {n: out[n] for n in order}


# ------------------------------------------------------------------------------ saving

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                torch.float64: "float64"}


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_checkpoint(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, path: str, layout: str = "openai",
                    max_shard_bytes: Optional[int] = None, overwrite: bool = False, progress: bool = True) -> List[str]:
    """Write `state_dict` (our names; dense or MXFP4 expert weights) to folder `path` as
    config.json (the format matching `layout`) plus safetensors in `layout` ("openai" or "hf").

    max_shard_bytes: split the tensors into shards of at most this many bytes (a larger single
      tensor gets a shard of its own), named model-0000k-of-0000n.safetensors, with a
      model.safetensors.index.json. None: one model.safetensors for "openai" (as the hub's
      original/ folder), 5 GiB shards for "hf".
    overwrite: replace an existing checkpoint in `path` (otherwise FileExistsError).
    Tensors are converted one shard at a time. Returns the files written.
    """
    if layout not in ("openai", "hf"):
        raise ValueError(f"layout must be 'openai' or 'hf', got {layout!r}")
    if max_shard_bytes is None:
        max_shard_bytes = 5 * 2**30 if layout == "hf" else 2**62
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    quantized = is_mxfp4_names(state_dict)
    _check_state_dict(state_dict, expected_shapes(cfg, quantized), "state dict")
    float_dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if layout == "openai":
        cfg.to_openai_dict()  # raises before anything is written if the format cannot hold cfg

    os.makedirs(path, exist_ok=True)
    old = glob.glob(os.path.join(path, "*.safetensors")) + [
        p for p in (os.path.join(path, "config.json"), os.path.join(path, _HF_INDEX)) if os.path.exists(p)]
    if old and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({sorted(map(os.path.basename, old))}); "
                              f"pass overwrite=True to replace it")
    for p in old:
        os.remove(p)

    # output tensors, lazily converted, with their byte sizes known up front
    if layout == "hf":
        items = [(rule, rule.theirs) for rule in _hf_rules(cfg, quantized)]
    else:
        items = [(None, (name,)) for name in expected_shapes(cfg, quantized)]
    sizes = []
    for rule, names in items:
        t = state_dict[rule.ours if rule else names[0]]
        per_row = t.element_size() * (t.numel() // t.shape[0] if t.dim() else 1)
        parts = ([per_row * r for r in rule.split] if rule is not None and rule.op == "rows"
                 else [t.element_size() * t.numel()])
        sizes.append(parts)
    shards: List[List[int]] = [[]]
    used = 0
    for k, parts in enumerate(sizes):
        nbytes = sum(parts)
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes

    written = []
    weight_map: Dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(items), desc=f"saving {os.path.basename(os.path.abspath(path))}", unit="tensor",
               disable=not progress)
    for s, members in enumerate(shards):
        fname = _shard_name(s, len(shards))
        tensors: Dict[str, torch.Tensor] = {}
        seen_storage = set()
        for k in members:
            rule, names = items[k]
            t = state_dict[rule.ours if rule else names[0]].detach().cpu().contiguous()
            parts = _to_theirs(rule, t) if rule else [t]
            for name, part in zip(names, parts):
                ptr = part.untyped_storage().data_ptr()
                if ptr in seen_storage:  # e.g. tied tensors: safetensors needs separate storage
                    part = part.clone()
                seen_storage.add(part.untyped_storage().data_ptr())
                tensors[name] = part
                weight_map[name] = fname
                total += part.numel() * part.element_size()
            bar.update(1)
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        written.append(os.path.join(path, fname))
        del tensors
    bar.close()
    if len(shards) > 1:
        with open(os.path.join(path, _HF_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
            f.write("\n")
        written.append(os.path.join(path, _HF_INDEX))
    if layout == "hf":
        dtype_name = _DTYPE_NAMES.get(next(iter(float_dtypes))) if len(float_dtypes) == 1 else None
        written.append(cfg.to_json(path, format="hf", mxfp4=quantized, dtype=dtype_name))
    else:
        written.append(cfg.to_json(path, format="openai"))
    return written


def parse_size(text: str) -> int:
    """Bytes from "123", "500MB", "5GB", "4GiB" (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 500MB, 5GB, 4GiB, 1000000)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(number * base ** power)
