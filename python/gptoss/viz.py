"""Figures of gpt-oss against GPT-2, computed from the code (gptoss.analysis, the attention oracle,
a model run through analysis.study) with matplotlib. Each function returns a Figure;
save_figures() writes the set as PNG files.

    gptoss figures docs/figures [--checkpoint CKPT --prompt TEXT]
"""
import os
from typing import Dict, List, Optional, Sequence

import torch

from . import analysis
from .config import ModelConfig


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def visibility(window: int, tokens: int) -> torch.Tensor:
    """[tokens, tokens] attention probabilities of a layer with this window (0: full causal) when
    every logit is equal, read off the attention oracle itself (gptoss_ext.reference.attention):
    q = 0 makes the logits equal and v = the identity returns each query's probabilities. A key a
    query cannot see gets exactly 0; the sink (here a logit of 0) takes its share of each row."""
    from gptoss_ext import reference
    q = torch.zeros(1, tokens, 1, tokens, dtype=torch.float64)
    v = torch.eye(tokens, dtype=torch.float64)[None, :, None, :]
    out, _ = reference.attention(q, torch.zeros_like(v), v, torch.zeros(1, dtype=torch.float64), window=window)
    return out[0, :, 0, :]


def attention_patterns(cfg: ModelConfig, tokens: int = 320):
    """Which keys each query sees on gpt-oss's two kinds of layers (and so which keys the KV cache
    must keep), next to GPT-2's dense causal attention."""
    plt = _plt()
    windows = [("sliding layer (window %d)" % cfg.sliding_window, cfg.sliding_window),
               ("full layer; GPT-2's every layer", 0)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, (title, w) in zip(axes, windows):
        p = visibility(w, tokens)
        ax.imshow((p > 0).numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(f"{title}: {int((p > 0).sum(1).max())} keys max", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(f"Attention visibility over {tokens} tokens (layers alternate, sliding first)", fontsize=10)
    fig.tight_layout()
    return fig


def parameter_breakdown(configs: Dict[str, analysis.Config]):
    """Parameters by component (stacked), with the active parameters per token marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(configs)
    bottom = [0.0] * len(names)
    for c in analysis.components(configs.values()):
        vals = [analysis.parameter_breakdown(cfg).get(c, 0) / 1e9 for cfg in configs.values()]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
    active = [analysis.active_parameters(cfg) / 1e9 for cfg in configs.values()]
    ax.scatter(names, active, color="black", marker="_", s=900, zorder=3, label="active per token")
    for i, (tot, act) in enumerate(zip(bottom, active)):
        ax.annotate(f"{tot:.2f} B total\n{act:.2f} B active", (i, tot), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("parameters (billions, log scale)")
    ax.set_title("Parameters by component", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def per_token_costs(configs: Dict[str, analysis.Config], max_context: int = 131072):
    """Forward FLOPs of a token and the KV cache of a sequence, against the context length."""
    plt = _plt()
    contexts = [2 ** i for i in range(4, max_context.bit_length()) if 2 ** i <= max_context]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, cfg in configs.items():
        a1.plot(contexts, [analysis.flops_per_token(cfg, c - 1) / 1e9 for c in contexts], marker=".", label=name)
        a2.plot(contexts, [analysis.kv_cache_bytes(cfg, c) / 2 ** 30 for c in contexts], marker=".", label=name)
    gpt2_limit = min((c.n_positions for c in configs.values() if not isinstance(c, ModelConfig)), default=0)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in context")
        if gpt2_limit:  # GPT-2 past its n_positions: the same architecture, extended
            ax.axvline(gpt2_limit, color="gray", linestyle=":", linewidth=1, label=f"GPT-2's {gpt2_limit} positions")
        ax.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("GFLOP per token (forward)")
    a1.set_title("Compute of the token at that position", fontsize=10)
    a2.set_yscale("log")
    a2.set_ylabel("GiB (bf16, one sequence)")
    a2.set_title("KV cache", fontsize=10)
    fig.tight_layout()
    return fig


def study_figure(stats: Dict[str, torch.Tensor], layer_types: Sequence[str], title: str = ""):
    """analysis.study's figures: the share of tokens each expert gets per layer, and the sink's
    attention mass per layer and head."""
    plt = _plt()
    counts = stats["expert_counts"].double()
    share = counts / counts.sum(1, keepdim=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    from matplotlib.ticker import MaxNLocator
    im = a1.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for axis in (a1.xaxis, a1.yaxis, a2.xaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("expert")
    a1.set_ylabel("layer")
    a1.set_title("Share of routed tokens per expert", fontsize=10)
    fig.colorbar(im, ax=a1)
    im = a2.imshow(stats["sink_mass"].numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    a2.set_xlabel("query head")
    a2.set_yticks(range(len(layer_types)))
    a2.set_yticklabels([f"{n} {t.split('_')[0]}" for n, t in enumerate(layer_types)], fontsize=6)
    a2.set_title("Attention mass on the sink", fontsize=10)
    fig.colorbar(im, ax=a2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def default_configs() -> Dict[str, analysis.Config]:
    return {name: analysis.named_config(name) for name in ("gpt2-xl", "gpt-oss-20b", "gpt-oss-120b")}


def save_figures(out_dir: str, model=None, tokens: Optional[torch.Tensor] = None, title: str = "") -> List[str]:
    """Write the figures as PNG files in out_dir; the study figure too when a model and tokens are
    given. Returns the paths written."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    figs = {"attention_patterns": attention_patterns(ModelConfig.preset("gpt-oss-20b")),
            "parameters": parameter_breakdown(default_configs()),
            "per_token_costs": per_token_costs(default_configs())}
    if model is not None:
        if tokens is None:
            raise ValueError("save_figures: a model needs tokens to study")
        figs["study"] = study_figure(analysis.study(model, tokens), model.cfg.layer_types, title)
    paths = []
    for name, fig in figs.items():
        path = os.path.join(out_dir, name + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["attention_patterns", "default_configs", "parameter_breakdown", "per_token_costs", "save_figures",
           "study_figure", "visibility"]
