"""Architecture accounting for gpt-oss and its GPT-2 baseline, computed from the configurations
(and checked in the tests against instantiated models, the spec's counts and torch's FLOP
counter): parameters by component, active parameters per token, forward FLOPs per token, weight
bytes, KV-cache bytes and the bytes one decode step reads.

Conventions. A multiply-add is 2 FLOPs. Matrix FLOPs count every weight matrix a token passes
through (for gpt-oss the router and only its k selected experts; the unembedding too; not the
embedding lookup, biases, norms or the softmax). Attention FLOPs are 4 x heads x head_dim per
visible key and layer (q k^T and p v): a token at position p sees min(p + 1, window) keys on a
sliding layer and p + 1 on a full one.
"""
from typing import Dict, Iterable, List, Sequence, Tuple, Union

from .checkpoint import checkpoint_nbytes, expected_shapes
from .config import ModelConfig
from .gpt2 import GPT2Config

Config = Union[ModelConfig, GPT2Config]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------ parameters

def _gptoss_component(name: str) -> str:
    if name == "embedding.weight":
        return "embedding"
    if name == "unembedding.weight":
        return "unembedding"
    if name.endswith("norm.scale"):
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".mlp.gate." in name:
        return "router"
    return "experts"


def _gpt2_shapes(cfg: GPT2Config) -> Dict[str, Tuple[int, ...]]:
    d, f = cfg.n_embd, 4 * cfg.n_embd
    out = {"transformer.wte.weight": (cfg.vocab_size, d), "transformer.wpe.weight": (cfg.n_positions, d)}
    for n in range(cfg.n_layer):
        p = f"transformer.h.{n}."
        out.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                    p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                    p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, f),
                    p + "mlp.c_fc.bias": (f,), p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
    out.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    return out


def _gpt2_component(name: str) -> str:
    if name.endswith("wte.weight"):
        return "embedding"  # also the (tied) unembedding
    if name.endswith("wpe.weight"):
        return "positions"
    if ".ln_" in name:
        return "norms"
    return "attention" if ".attn." in name else "mlp"


def parameter_shapes(cfg: Config) -> Dict[str, Tuple[int, ...]]:
    """Every parameter's shape (gpt-oss: OpenAI checkpoint names, dense experts; GPT-2: Hugging
    Face names)."""
    if isinstance(cfg, GPT2Config):
        return _gpt2_shapes(cfg)
    return {name: shape for name, (shape, _) in expected_shapes(cfg, mxfp4=False).items()}


def parameter_breakdown(cfg: Config) -> Dict[str, int]:
    """Parameters by component, in model order (gpt-oss: embedding, attention, router, experts,
    norms, unembedding; GPT-2: embedding (tied), positions, attention, mlp, norms)."""
    comp = _gpt2_component if isinstance(cfg, GPT2Config) else _gptoss_component
    out: Dict[str, int] = {}
    for name, shape in parameter_shapes(cfg).items():
        out[comp(name)] = out.get(comp(name), 0) + _numel(shape)
    return out


def active_parameters(cfg: Config) -> int:
    """Parameters one token uses: everything but the input embedding (a lookup), with only the k
    selected experts (spec §1.2's convention; for GPT-2, with its tied matrix counted once, as the
    unembedding)."""
    b = parameter_breakdown(cfg)
    if isinstance(cfg, GPT2Config):
        return sum(b.values()) - b["positions"]
    return (sum(b.values()) - b["embedding"] - b["experts"]
            + b["experts"] * cfg.experts_per_token // cfg.num_experts)


# ------------------------------------------------------------------------------ FLOPs

def matrix_params_per_token(cfg: Config) -> int:
    """Weight-matrix entries one token multiplies with (see the module's conventions)."""
    if isinstance(cfg, GPT2Config):
        return cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    d, inter = cfg.hidden_size, cfg.intermediate_size
    attn = d * cfg.qkv_dim + cfg.num_attention_heads * cfg.head_dim * d
    mlp = cfg.num_experts * d + cfg.experts_per_token * 3 * inter * d
    return cfg.num_hidden_layers * (attn + mlp) + cfg.vocab_size * d


def _layers(cfg: Config) -> List[Tuple[int, int, int]]:
    """(window or 0, heads, head_dim) of each layer."""
    if isinstance(cfg, GPT2Config):
        return [(0, cfg.n_head, cfg.head_dim)] * cfg.n_layer
    return [(cfg.window(n), cfg.num_attention_heads, cfg.head_dim) for n in range(cfg.num_hidden_layers)]


def attention_flops(cfg: Config, position: int) -> int:
    """Attention FLOPs (q k^T and p v, all layers) of the token at `position` (0-based)."""
    return sum(4 * h * hd * (min(position + 1, w) if w else position + 1) for w, h, hd in _layers(cfg))


def flops_per_token(cfg: Config, position: int) -> int:
    """Forward FLOPs of the token at `position`: 2 x matrix entries + attention."""
    return 2 * matrix_params_per_token(cfg) + attention_flops(cfg, position)


def forward_flops(cfg: Config, tokens: int, causal: bool = True) -> int:
    """FLOPs of one forward over `tokens` positions of a sequence. causal=False counts every query
    against all `tokens` keys in every layer, windows ignored (what dense attention kernels compute
    and torch's FLOP counter reports for them)."""
    if causal:
        return sum(flops_per_token(cfg, p) for p in range(tokens))
    dense = sum(4 * h * hd * tokens for _, h, hd in _layers(cfg))
    return tokens * (2 * matrix_params_per_token(cfg) + dense)


# ------------------------------------------------------------------------------ memory

def weight_bytes(cfg: Config, mxfp4: bool = True, float_bytes: int = 2) -> int:
    """Bytes of the weights as stored (gpt-oss: bf16 with MXFP4 experts by default, i.e. the
    released checkpoints; GPT-2: `float_bytes` per parameter)."""
    if isinstance(cfg, GPT2Config):
        return sum(parameter_breakdown(cfg).values()) * float_bytes
    return checkpoint_nbytes(cfg, mxfp4=mxfp4, float_bytes=float_bytes)


def kv_cache_bytes(cfg: Config, context: int, batch: int = 1, float_bytes: int = 2) -> int:
    """Bytes of keys and values a cache must hold for `context` tokens: a sliding layer keeps only
    its window, grouped-query attention only its KV heads."""
    if isinstance(cfg, GPT2Config):
        return batch * cfg.n_layer * 2 * cfg.n_embd * context * float_bytes
    kv = cfg.num_key_value_heads * cfg.head_dim
    return batch * sum(2 * kv * (min(context, w) if w else context) for w, _, _ in _layers(cfg)) * float_bytes


def decode_bytes_per_token(cfg: Config, context: int, experts: str = "mxfp4", float_bytes: int = 2) -> int:
    """Bytes one decode token reads at batch 1 after `context` cached tokens: per layer the
    attention weights (qkv, out, biases, sinks, norm), the router, the k selected experts' weights
    and biases (MXFP4 blocks + scales, or dense), the visible part of the KV cache (the window on
    sliding layers); then the final norm, the unembedding and one embedding row. Activations and
    the new k/v rows are ignored (tiny). Norm scales and sinks are float32. GPT-2: every weight
    but the position table, one position row, and the whole cache."""
    if isinstance(cfg, GPT2Config):
        return ((active_parameters(cfg) + cfg.n_embd) * float_bytes
                + kv_cache_bytes(cfg, context + 1, float_bytes=float_bytes))
    if experts not in ("mxfp4", "dense"):
        raise ValueError(f"experts must be 'mxfp4' or 'dense', got {experts!r}")
    d, e, k, inter = cfg.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    fb = float_bytes
    qkv_out = hd * (hq + 2 * hkv)
    attn = (d * qkv_out + qkv_out + hq * hd * d + d) * fb + hq * 4 + d * 4
    router = (e * d + e) * fb + d * 4
    if experts == "mxfp4":
        w = (2 * inter * d + d * inter) // 2 + (2 * inter * d + d * inter) // 32
    else:
        w = (2 * inter * d + d * inter) * fb
    expert = k * (w + (2 * inter + d) * fb)
    total = 0
    for n in range(cfg.num_hidden_layers):
        window = cfg.window(n)
        keys = min(context + 1, window) if window > 0 else context + 1
        total += attn + router + expert + 2 * keys * hkv * hd * fb
    return total + d * 4 + cfg.vocab_size * d * fb + d * fb


# ------------------------------------------------------------------------------ report

def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def components(configs: Iterable[Config]) -> List[str]:
    """The parameter components of all these configurations, each once, in model order."""
    out: List[str] = []
    for cfg in configs:
        out += [c for c in parameter_breakdown(cfg) if c not in out]
    return out


def report(configs: Dict[str, Config], context: int = 4096, parameters: bool = True) -> str:
    """Markdown tables comparing the named configurations: parameters by component (unless
    parameters=False), active parameters and FLOPs per token, weights, KV cache and decode bytes at
    `context` tokens."""
    names = list(configs)
    comps = components(configs.values())
    lines: List[str] = []
    if parameters:
        lines += ["### Parameters", "", "| component | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for c in comps:
            lines.append(f"| {c} | " + " | ".join(f"{parameter_breakdown(cfg).get(c, 0):,}"
                                                 for cfg in configs.values()) + " |")
        lines.append("| **total** | " + " | ".join(f"**{sum(parameter_breakdown(c).values()):,}**"
                                                for c in configs.values()) + " |")
        lines.append("| active per token | " + " | ".join(f"{active_parameters(c):,}" for c in configs.values())
                     + " |")
        lines.append("")
    lines += [f"### Per token at context {context}", "", "| quantity | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    rows = [
        ("forward FLOPs, token at position context - 1", lambda c: _fmt(flops_per_token(c, context - 1))),
        ("of which attention", lambda c: f"{attention_flops(c, context - 1) / flops_per_token(c, context - 1):.1%}"),
        ("forward FLOPs, mean over a prompt of `context` tokens",
         lambda c: _fmt(forward_flops(c, context) / context)),
        ("weights (bf16; gpt-oss experts MXFP4)", lambda c: _gib(weight_bytes(c))),
        ("KV cache per sequence (bf16)", lambda c: _gib(kv_cache_bytes(c, context))),
        ("KV cache per token of context, mean", lambda c: f"{kv_cache_bytes(c, context) / context / 1024:.1f} KiB"),
        ("bytes read per decode token (batch 1)", lambda c: _gib(decode_bytes_per_token(c, context))),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(c) for c in configs.values()) + " |")
    short = [n for n, c in configs.items() if isinstance(c, GPT2Config) and c.n_positions < context]
    if short:
        lines += ["", f"({', '.join(short)}: n_positions is below {context}; these figures extend the same "
                      "architecture to that context.)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ a model at work

def study(model, tokens) -> Dict[str, "torch.Tensor"]:
    """Run `model` (a gptoss.Transformer) over `tokens` [B, T] and report, per layer, how it routes
    and how much attention its sinks take:

    expert_counts [L, E] int64: tokens sent to each expert (each token picks experts_per_token);
    sink_mass [L, Hq] float32: the attention probability each query head gives its sink, averaged
        over the tokens (exp(sink - lse), lse including the sink: spec §2.2);
    logits [B, T, vocab]: the forward's output.
    The routing is recomputed from each MoE block's own router input with its router and
    ops.moe_route, as the block routes (top-k, ties to the lower index)."""
    import torch
    from gptoss_ext import ops
    cfg = model.cfg
    L, E = cfg.num_hidden_layers, cfg.num_experts
    counts = torch.zeros(L, E, dtype=torch.int64)
    sink_sum = torch.zeros(L, cfg.num_attention_heads, dtype=torch.float64)

    def attn_observer(n, blk):
        def observe(lse):
            p = torch.exp(blk.sinks.detach().double()[None, :, None] - lse.detach().double())  # [B, Hq, T]
            sink_sum[n] += p.sum(dim=(0, 2)).cpu()
        return observe

    def mlp_observer(n, blk):
        def observe(t):
            _, experts = ops.moe_route(blk.gate(t), cfg.experts_per_token)
            counts[n] += torch.bincount(experts.reshape(-1).long().cpu(), minlength=E)
        return observe

    blocks = list(model.block)
    try:
        for n, b in enumerate(blocks):
            b.attn.observer, b.mlp.observer = attn_observer(n, b.attn), mlp_observer(n, b.mlp)
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for b in blocks:
            b.attn.observer = b.mlp.observer = None
    return {"expert_counts": counts, "sink_mass": (sink_sum / tokens.numel()).float(), "logits": logits}


def study_report(stats: Dict[str, "torch.Tensor"], layer_types: Sequence[str]) -> str:
    """A markdown table of study()'s figures per layer."""
    counts, sink = stats["expert_counts"], stats["sink_mass"]
    lines = ["| layer | attention | sink mass mean | sink mass max head | experts used | busiest expert share "
             "| load max / mean |", "|---|---|---|---|---|---|---|"]
    for n in range(counts.shape[0]):
        c = counts[n].double()
        lines.append(f"| {n} | {layer_types[n].replace('_attention', '')} | {sink[n].mean():.3f} | {sink[n].max():.3f} "
                     f"| {int((c > 0).sum())} / {c.numel()} | {c.max() / c.sum():.3f} | {c.max() / c.mean():.2f} |")
    return "\n".join(lines) + "\n"


def named_config(name: str) -> Config:
    """A gpt-oss preset (gptoss.PRESETS) or a GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl)."""
    from .config import PRESETS
    from .gpt2 import GPT2_PRESETS
    if name in PRESETS:
        return ModelConfig.preset(name)
    if name in GPT2_PRESETS:
        return GPT2_PRESETS[name]
    raise ValueError(f"unknown configuration {name!r}; known: {sorted(PRESETS) + sorted(GPT2_PRESETS)}")


__all__ = ["active_parameters", "attention_flops", "components", "decode_bytes_per_token", "flops_per_token",
           "forward_flops", "kv_cache_bytes", "matrix_params_per_token", "named_config", "parameter_breakdown",
           "parameter_shapes", "report", "study", "study_report", "weight_bytes"]
