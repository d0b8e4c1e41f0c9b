"""Model configuration (spec §1.1): one frozen dataclass with the OpenAI field names, named presets,
and reading/writing of both `config.json` formats.

Formats
-------
* OpenAI (`original/config.json`, read by the reference as `ModelConfig(**json)`): exactly the 16
  keys of `OPENAI_FIELDS`. It cannot express `rms_norm_eps` (always 1e-5), `swiglu_alpha` (always
  1.702), `layer_types` (even layers slide when sliding_window > 0, none when it is 0) or
  `max_position_embeddings` (initial_context_length * rope_scaling_factor); `to_openai_dict`
  raises ValueError when a config differs from those implied values.
* Hugging Face (`GptOssConfig`). Written exactly as transformers 5.24 `save_pretrained` writes it:
  RoPE under `rope_parameters` with `rope_theta` inside. Read from both that form and the hub's
  older one (`rope_scaling` plus a top-level `rope_theta`).

Mapping decisions for the HF RoPE settings (spec §6.2 #5, #6):
* `factor` is authoritative when present: it becomes rope_scaling_factor (this is what the
  reference and transformers >= 5 use). Only when `factor` is absent or null is it taken as
  max_position_embeddings / original_max_position_embeddings (what every transformers version
  does then). `max_position_embeddings` is kept as its own field (the context limit). When it
  differs from original_max_position_embeddings * factor, reading warns: transformers 4.x
  recomputed the factor from that ratio, so such a file means a different RoPE there.
  `to_hf_dict` writes max_position_embeddings = initial_context_length * factor unless the field
  was set otherwise, so files we write mean the same RoPE to every transformers version.
* `truncate`: only `false` reproduces the reference (no floor/ceil of YaRN's low/high). A YaRN
  entry with `truncate: true`, or without the key (which transformers treats as true), is
  rejected with ValueError; nothing in this project implements the truncated ramp.
* `original_max_position_embeddings` is required for YaRN (it is the reference's
  initial_context_length); transformers would silently substitute max_position_embeddings.
* `beta_fast` -> rope_ntk_beta, `beta_slow` -> rope_ntk_alpha (HFconv); absent or 0 mean 32 / 1,
  as in transformers. `attention_factor` is accepted only if it equals the reference's
  concentration 0.1*ln(factor) + 1; `mscale`, `mscale_all_dim` and a partial rotary factor are
  rejected. rope_type "default" means no YaRN (rope_scaling_factor 1.0).
* Keys that do not affect the forward pass (token ids, dropout, init range, aux-loss settings,
  `hidden_act`, which the gpt-oss modelling code never reads, ...) are accepted and dropped.
  Keys that would change the math in a way this model cannot follow (tied embeddings, no
  attention bias, non-mxfp4 quantization) and unknown keys give one ValueError listing them.
"""
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

SLIDING = "sliding_attention"
FULL = "full_attention"

#: The keys of the OpenAI `config.json`, in the order the hub files list them (spec §1.1).
OPENAI_FIELDS: Tuple[str, ...] = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
    "rope_ntk_beta")

_INT_FIELDS = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
               "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
               "initial_context_length")
_FLOAT_FIELDS = ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
                 "rms_norm_eps", "swiglu_alpha")

# Values the OpenAI format implies for the fields it cannot express (T hard-codes them).
OPENAI_RMS_NORM_EPS = 1e-5
OPENAI_SWIGLU_ALPHA = 1.702

#: The transformers release whose GptOssConfig serialization `to_hf_dict` reproduces.
HF_TRANSFORMERS_VERSION = "5.24.0"

# HF config keys accepted and dropped: they do not change the inference forward pass.
_HF_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "attention_dropout", "initializer_range", "router_aux_loss_coef", "output_router_logits", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "quantization_config",
    # generic PreTrainedConfig serialization keys (older transformers wrote them all)
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "num_labels", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type",
})
# HF keys that are read into ModelConfig fields (other than the RoPE ones).
_HF_MODEL_KEYS = frozenset({
    "num_hidden_layers", "num_local_experts", "num_experts", "num_experts_per_tok", "vocab_size",
    "hidden_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "layer_types", "rms_norm_eps", "swiglu_limit", "swiglu_alpha", "max_position_embeddings",
    "attention_bias", "tie_word_embeddings",
    # OpenAI-named leftovers that the hub's HF config.json also carries; must agree when present
    "experts_per_token", "initial_context_length",
    # RoPE
    "rope_parameters", "rope_scaling", "rope_theta", "original_max_position_embeddings",
})
_HF_REQUIRED_KEYS = ("num_hidden_layers", "num_experts_per_tok", "vocab_size", "hidden_size", "intermediate_size",
                     "head_dim", "num_attention_heads", "num_key_value_heads")
_HF_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                           "beta_fast", "beta_slow", "truncate", "attention_factor", "partial_rotary_factor"})
# The hub's quantization_config for the MXFP4 checkpoints (HUB `config.json`).
HF_MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
# transformers' GptOssConfig default RoPE entry, used when a file has none.
_HF_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 4096}
_HF_DEFAULT_THETA = 150000.0
_HF_DEFAULT_MAX_POSITIONS = 131072


def default_layer_types(num_hidden_layers: int, sliding_window: int) -> Tuple[str, ...]:
    """The reference's pattern (T `sliding_window if layer_idx % 2 == 0 else 0`): even layers slide
    when sliding_window > 0; with sliding_window == 0 every layer is full causal."""
    return tuple(SLIDING if (i % 2 == 0 and sliding_window > 0) else FULL for i in range(num_hidden_layers))


def _yarn_low_high(head_dim: int, rope_theta: float, initial_context_length: int, rope_ntk_alpha: float,
                  rope_ntk_beta: float) -> Tuple[float, float]:
    """YaRN's correction range without floor/ceil (spec §2.3); the same formula as
    gptoss_ext.reference.yarn_low_high, repeated so that this module needs no torch."""
    d_half = head_dim / 2
    low = d_half * math.log(initial_context_length / (rope_ntk_beta * 2 * math.pi)) / math.log(rope_theta)
    high = d_half * math.log(initial_context_length / (rope_ntk_alpha * 2 * math.pi)) / math.log(rope_theta)
    return low, high


def yarn_concentration(rope_scaling_factor: float) -> float:
    """The YaRN attention factor the reference multiplies cos/sin by (1.0 without scaling)."""
    return 0.1 * math.log(rope_scaling_factor) + 1.0 if rope_scaling_factor > 1.0 else 1.0


@dataclass(frozen=True)
class ModelConfig:
    """GPT-OSS hyper-parameters. Field names follow the OpenAI checkpoint config (spec §1.1).

    Derived defaults: `layer_types` = default_layer_types(num_hidden_layers, sliding_window);
    `max_position_embeddings` = round(initial_context_length * rope_scaling_factor).
    Every inconsistency found at construction is reported in one ValueError.
    """
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = OPENAI_RMS_NORM_EPS
    # Per layer: "sliding_attention" (window `sliding_window`) or "full_attention" (causal).
    layer_types: Optional[Tuple[str, ...]] = None
    swiglu_alpha: float = OPENAI_SWIGLU_ALPHA
    # Longest context the model is meant to run (HF `max_position_embeddings`).
    max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        problems = []

        def put(name, value):
            object.__setattr__(self, name, value)

        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                problems.append(f"{name} must be an integer, got {v!r}")
            else:
                put(name, int(v))
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                problems.append(f"{name} must be a finite number, got {v!r}")
            else:
                put(name, float(v))
        if problems:  # the checks below need the types
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                     "initial_context_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("swiglu_limit", "rms_norm_eps", "swiglu_alpha", "rope_ntk_alpha", "rope_ntk_beta"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sliding_window < 0:
            problems.append(f"sliding_window must be >= 0 (0 = no sliding layers), got {self.sliding_window}")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even (RoPE rotates pairs (i, i + head_dim/2)), got {self.head_dim}")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.experts_per_token > self.num_experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) must be <= num_experts ({self.num_experts})")
        if self.rope_theta <= 1.0:
            problems.append(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.rope_scaling_factor < 1.0:
            problems.append(f"rope_scaling_factor must be >= 1 (1 = no YaRN), got {self.rope_scaling_factor}")

        if self.layer_types is None:
            put("layer_types", default_layer_types(self.num_hidden_layers, self.sliding_window))
        elif isinstance(self.layer_types, (list, tuple)):
            put("layer_types", tuple(self.layer_types))
        if (not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_hidden_layers
                or any(t not in (SLIDING, FULL) for t in self.layer_types)):
            problems.append(f"layer_types must list '{SLIDING}' or '{FULL}' for each of the {self.num_hidden_layers} "
                            f"layers, got {self.layer_types!r}")
        elif self.sliding_window == 0 and SLIDING in self.layer_types:
            problems.append("layer_types has sliding layers but sliding_window is 0")

        if self.max_position_embeddings is None:
            put("max_position_embeddings", self._implied_max_positions())
        mp = self.max_position_embeddings
        if isinstance(mp, bool) or not isinstance(mp, numbers.Integral) or mp <= 0:
            problems.append(f"max_position_embeddings must be an integer > 0, got {mp!r}")
        else:
            put("max_position_embeddings", int(mp))

        if (self.rope_scaling_factor > 1.0 and self.head_dim > 0 and self.rope_theta > 1.0
                and self.initial_context_length > 0 and self.rope_ntk_alpha > 0 and self.rope_ntk_beta > 0):
            low, high = _yarn_low_high(self.head_dim, self.rope_theta, self.initial_context_length,
                                      self.rope_ntk_alpha, self.rope_ntk_beta)
            if not 0 < low < high < self.head_dim / 2 - 1:
                problems.append(
                    f"YaRN needs 0 < low < high < head_dim/2 - 1 = {self.head_dim / 2 - 1} (the reference asserts "
                    f"this); got low={low:.6g}, high={high:.6g} from head_dim={self.head_dim}, "
                    f"rope_theta={self.rope_theta}, initial_context_length={self.initial_context_length}, "
                    f"rope_ntk_alpha={self.rope_ntk_alpha}, rope_ntk_beta={self.rope_ntk_beta}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def _implied_max_positions(self) -> int:
        return int(round(self.initial_context_length * self.rope_scaling_factor))

    # ------------------------------------------------------------------ derived quantities
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_dim(self) -> int:
        """Rows of the fused qkv projection: head_dim * (H_q + 2 H_kv)."""
        return self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)

    def window(self, layer: int) -> int:
        """Sliding window of `layer` (0 = full causal)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else 0

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset with some fields replaced; derived fields (layer_types,
        max_position_embeddings) are recomputed unless given."""
        if name not in _PRESET_ARGS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(_PRESET_ARGS))}")
        return cls(**{**_PRESET_ARGS[name], **overrides})

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    # ------------------------------------------------------------------ OpenAI format
    @classmethod
    def from_openai_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """From an OpenAI `config.json` dict: exactly the 16 OPENAI_FIELDS, all required."""
        if not isinstance(d, dict):
            raise ValueError(f"OpenAI config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in OPENAI_FIELDS if k not in d]
        unknown = sorted(k for k in d if k not in OPENAI_FIELDS)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unknown:
                parts.append(f"unknown keys {unknown}")
            raise ValueError("OpenAI config.json: " + "; ".join(parts) + f" (expected exactly {list(OPENAI_FIELDS)})")
        return cls(**{k: d[k] for k in OPENAI_FIELDS})

    def openai_incompatibilities(self) -> List[str]:
        """The fields whose values the OpenAI format cannot express (empty if none)."""
        out = []
        if self.rms_norm_eps != OPENAI_RMS_NORM_EPS:
            out.append(f"rms_norm_eps={self.rms_norm_eps} (the format implies {OPENAI_RMS_NORM_EPS})")
        if self.swiglu_alpha != OPENAI_SWIGLU_ALPHA:
            out.append(f"swiglu_alpha={self.swiglu_alpha} (the format implies {OPENAI_SWIGLU_ALPHA})")
        if self.layer_types != default_layer_types(self.num_hidden_layers, self.sliding_window):
            out.append(f"layer_types={list(self.layer_types)} (the format implies "
                       f"{'even layers sliding' if self.sliding_window else 'no sliding layers'})")
        if self.max_position_embeddings != self._implied_max_positions():
            out.append(f"max_position_embeddings={self.max_position_embeddings} (the format implies "
                       f"initial_context_length * rope_scaling_factor = {self._implied_max_positions()})")
        return out

    def to_openai_dict(self) -> Dict[str, Any]:
        """The 16-key OpenAI dict. ValueError when a field the format cannot express differs from
        the value it implies (use dataclasses.replace to change those fields first)."""
        bad = self.openai_incompatibilities()
        if bad:
            raise ValueError("config cannot be written in the OpenAI format: " + "; ".join(bad))
        return {k: getattr(self, k) for k in OPENAI_FIELDS}

    # ------------------------------------------------------------------ Hugging Face format
    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face GptOssConfig dict (either RoPE form). See the module docstring for the
        mapping; one ValueError lists every missing, unknown or inconsistent key."""
        if not isinstance(d, dict):
            raise ValueError(f"HF config must be a JSON object, got {type(d).__name__}")
        problems: List[str] = []
        unknown = sorted(k for k in d if k not in _HF_MODEL_KEYS and k not in _HF_IGNORED_KEYS)
        if unknown:
            problems.append(f"unknown keys {unknown}")
        missing = [k for k in _HF_REQUIRED_KEYS if d.get(k) is None]
        if d.get("num_local_experts") is None and d.get("num_experts") is None:
            missing.append("num_local_experts")
        if missing:
            problems.append(f"missing keys {missing} (transformers would fill in gpt-oss-120b defaults)")

        def same(key_a, key_b):
            if d.get(key_a) is not None and d.get(key_b) is not None and d[key_a] != d[key_b]:
                problems.append(f"{key_a}={d[key_a]!r} disagrees with {key_b}={d[key_b]!r}")

        same("num_local_experts", "num_experts")
        same("num_experts_per_tok", "experts_per_token")
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            problems.append(f"model_type must be 'gpt_oss', got {d['model_type']!r}")
        if d.get("attention_bias", True) is not True:
            problems.append(f"attention_bias must be true (gpt-oss has q/k/v/o biases), got {d['attention_bias']!r}")
        if d.get("tie_word_embeddings", False) is not False:
            problems.append(f"tie_word_embeddings must be false (gpt-oss has a separate unembedding), got "
                            f"{d['tie_word_embeddings']!r}")
        qc = d.get("quantization_config")
        if qc is not None and (not isinstance(qc, dict) or qc.get("quant_method") != "mxfp4"):
            problems.append(f"quantization_config: only quant_method 'mxfp4' is supported, got {qc!r}")

        kw: Dict[str, Any] = {}
        for ours, theirs in (("num_hidden_layers", "num_hidden_layers"), ("experts_per_token", "num_experts_per_tok"),
                             ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                             ("intermediate_size", "intermediate_size"), ("head_dim", "head_dim"),
                             ("num_attention_heads", "num_attention_heads"),
                             ("num_key_value_heads", "num_key_value_heads")):
            if d.get(theirs) is not None:
                kw[ours] = d[theirs]
        experts = d.get("num_local_experts", d.get("num_experts"))
        if experts is not None:
            kw["num_experts"] = experts
        sw = d.get("sliding_window", 128)
        kw["sliding_window"] = 0 if sw is None else sw
        for key in ("rms_norm_eps", "swiglu_limit", "swiglu_alpha"):
            if key in d:
                if d[key] is None:
                    problems.append(f"{key} must be a number, got null")
                else:
                    kw[key] = d[key]
        if d.get("layer_types") is not None:
            kw["layer_types"] = d["layer_types"]
        if d.get("max_position_embeddings") is not None:
            kw["max_position_embeddings"] = d["max_position_embeddings"]
        kw.update(_read_hf_rope(d, problems))

        if problems:
            raise ValueError("HF config.json: " + "; ".join(problems))
        return cls(**kw)

    def to_hf_dict(self, mxfp4: bool = False, dtype: Optional[str] = None) -> Dict[str, Any]:
        """The dict transformers 5.24's GptOssConfig.save_pretrained writes for this model.

        mxfp4: add the hub's `quantization_config` (the checkpoint stores MXFP4 expert weights).
        dtype: the "dtype" entry (e.g. "bfloat16"), written by transformers when a model is saved.
        Keys without an equivalent here get GptOssConfig's defaults (token ids null, aux-loss
        coefficient 0.001, ...).
        """
        d: Dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "bos_token_id": None,
            "eos_token_id": None,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": None,
            "rms_norm_eps": self.rms_norm_eps,
            # Always the yarn entry (with factor 1.0 it equals plain RoPE), so that no setting is lost.
            "rope_parameters": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_theta": self.rope_theta,
                "rope_type": "yarn",
                "truncate": False,
            },
            "router_aux_loss_coef": 0.001,
            "sliding_window": self.sliding_window if self.sliding_window > 0 else None,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "transformers_version": HF_TRANSFORMERS_VERSION,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if mxfp4:
            d["quantization_config"] = json.loads(json.dumps(HF_MXFP4_QUANTIZATION_CONFIG))
        if dtype is not None:
            d["dtype"] = dtype
        return dict(sorted(d.items()))

    # ------------------------------------------------------------------ files
    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Read a `config.json` (or the one inside folder `path`) in either format."""
        cfg, _ = read_config_file(path)
        return cfg

    def to_json(self, path: str, format: str = "openai", **hf_kwargs) -> str:
        """Write config.json in `format` ("openai" or "hf"; hf_kwargs go to to_hf_dict) to `path`,
        or to path/config.json when `path` is a folder. Returns the file written."""
        if format == "openai":
            if hf_kwargs:
                raise ValueError(f"to_json: {sorted(hf_kwargs)} only apply to format='hf'")
            d = self.to_openai_dict()
        elif format == "hf":
            d = self.to_hf_dict(**hf_kwargs)
        else:
            raise ValueError(f"to_json: format must be 'openai' or 'hf', got {format!r}")
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(d, f, indent=2, sort_keys=format == "hf")
            f.write("\n")
        return path


def _read_hf_rope(d: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    """ModelConfig keyword arguments from the RoPE entries of an HF config dict."""
    rp, rs = d.get("rope_parameters"), d.get("rope_scaling")
    for key, value in (("rope_parameters", rp), ("rope_scaling", rs)):
        if value is not None and not isinstance(value, dict):
            problems.append(f"{key} must be an object, got {value!r}")
            return {}
    if rp is None and rs is None:
        rope = dict(_HF_DEFAULT_ROPE)
    else:
        rope = dict(rp or {})
        for k, v in (rs or {}).items():
            if k in rope and rope[k] != v:
                problems.append(f"rope_scaling[{k!r}]={v!r} disagrees with rope_parameters[{k!r}]={rope[k]!r}")
            rope[k] = v
    out: Dict[str, Any] = {}

    unknown = sorted(k for k in rope if k not in _HF_ROPE_KEYS)
    unsupported = [k for k in unknown if k in ("mscale", "mscale_all_dim")]
    if unsupported:
        problems.append(f"rope entries {unsupported} are not supported (they change YaRN's attention factor "
                        f"away from the reference's 0.1*ln(factor) + 1)")
    if [k for k in unknown if k not in unsupported]:
        problems.append(f"unknown rope entries {[k for k in unknown if k not in unsupported]}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']!r} is not supported (gpt-oss rotates "
                        f"the whole head)")

    top_theta, inner_theta = d.get("rope_theta"), rope.get("rope_theta")
    if top_theta is not None and inner_theta is not None and top_theta != inner_theta:
        problems.append(f"rope_theta={top_theta!r} disagrees with the rope entry's rope_theta={inner_theta!r}")
    theta = inner_theta if inner_theta is not None else top_theta
    out["rope_theta"] = _HF_DEFAULT_THETA if theta is None else theta

    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "rope_type" in rope and "type" in rope and rope["rope_type"] != rope["type"]:
        problems.append(f"rope_type={rope['rope_type']!r} disagrees with type={rope['type']!r}")
    max_pos = d.get("max_position_embeddings")
    top_orig, inner_orig = d.get("original_max_position_embeddings"), rope.get("original_max_position_embeddings")
    if top_orig is not None and inner_orig is not None and top_orig != inner_orig:
        problems.append(f"original_max_position_embeddings={top_orig!r} disagrees with the rope entry's "
                        f"{inner_orig!r}")
    orig = top_orig if top_orig is not None else inner_orig
    leftover_l0 = d.get("initial_context_length")

    if rope_type == "yarn":
        if rope.get("truncate", True) is not False:
            problems.append(
                f"rope truncate={rope.get('truncate', '(absent: transformers treats it as true)')!r}: truncation "
                f"floors/ceils YaRN's low/high, which the gpt-oss reference does not do; only 'truncate': false "
                f"is supported")
        if orig is None:
            problems.append("YaRN needs original_max_position_embeddings (the reference's initial_context_length); "
                            "transformers would silently use max_position_embeddings")
            return out
        factor = rope.get("factor")
        if factor is None:
            if max_pos is None:
                problems.append("YaRN factor is missing and max_position_embeddings is absent")
                return out
            factor = max_pos / orig  # what transformers does without an explicit factor
        elif max_pos is not None and max_pos != orig * factor:
            warnings.warn(
                f"HF config: max_position_embeddings ({max_pos}) != original_max_position_embeddings ({orig}) * "
                f"factor ({factor}); the explicit factor is used (as the reference and transformers >= 5 do), "
                f"but transformers 4.x would use the ratio {max_pos / orig:g} as the YaRN factor", UserWarning,
                stacklevel=3)
        beta_fast = rope.get("beta_fast") or 32.0
        beta_slow = rope.get("beta_slow") or 1.0
        att = rope.get("attention_factor")
        if (att is not None and isinstance(factor, numbers.Real)
                and not math.isclose(att, yarn_concentration(factor), rel_tol=1e-12)):
            problems.append(f"rope attention_factor={att!r} differs from the reference's concentration "
                            f"0.1*ln(factor) + 1 = {yarn_concentration(factor)!r}; not supported")
        if leftover_l0 is not None and leftover_l0 != orig:
            problems.append(f"initial_context_length={leftover_l0!r} disagrees with original_max_position_embeddings="
                            f"{orig!r}")
        out.update(rope_scaling_factor=factor, initial_context_length=orig, rope_ntk_beta=beta_fast,
                   rope_ntk_alpha=beta_slow)
    elif rope_type == "default":
        if rope.get("factor") not in (None, 1, 1.0):
            problems.append(f"rope_type 'default' with factor={rope['factor']!r}: only yarn scales")
        l0 = next((v for v in (leftover_l0, orig, max_pos) if v is not None), _HF_DEFAULT_MAX_POSITIONS)
        out.update(rope_scaling_factor=1.0, initial_context_length=l0,
                   rope_ntk_beta=rope.get("beta_fast") or 32.0, rope_ntk_alpha=rope.get("beta_slow") or 1.0)
    else:
        problems.append(f"rope_type {rope_type!r} is not supported (gpt-oss uses 'yarn')")
    return out


def detect_config_format(d: Dict[str, Any]) -> str:
    """"hf" for a Hugging Face GptOssConfig dict, "openai" for the OpenAI one."""
    hf_markers = {"model_type", "num_local_experts", "num_experts_per_tok", "rope_scaling", "rope_parameters",
                  "layer_types", "max_position_embeddings", "rms_norm_eps", "architectures"}
    return "hf" if isinstance(d, dict) and hf_markers & set(d) else "openai"


def read_config_file(path: str) -> Tuple[ModelConfig, str]:
    """(config, "openai" | "hf") from a config.json file, or from the config.json inside folder `path`."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    fmt = detect_config_format(d)
    try:
        cfg = ModelConfig.from_hf_dict(d) if fmt == "hf" else ModelConfig.from_openai_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg, fmt


# Presets as constructor arguments, so that ModelConfig.preset(...) overrides recompute derived fields.
_PRESET_ARGS: Dict[str, Dict[str, Any]] = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_experts=128),
    "notebook-demo": dict(num_hidden_layers=2, num_experts=8, experts_per_token=2, vocab_size=5000,
                          hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=64, sliding_window=128,
                          initial_context_length=512, rope_theta=10000.0, rope_scaling_factor=1.0),
    # Tests: every feature on at toy sizes (GQA 2:1, sliding + full layers, top-2 of 4 experts,
    # YaRN with a blended band: low = 1.885, high = 5.096 for d_half = 8). hidden and intermediate
    # are multiples of 32 so the expert weights can be MXFP4.
    "tiny-test": dict(num_hidden_layers=3, num_experts=4, experts_per_token=2, vocab_size=1000, hidden_size=64,
                      intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      sliding_window=8, initial_context_length=16, rope_theta=1000.0, rope_scaling_factor=4.0,
                      rope_ntk_alpha=0.03125, rope_ntk_beta=0.5),
}

PRESETS: Dict[str, ModelConfig] = {name: ModelConfig(**args) for name, args in _PRESET_ARGS.items()}
