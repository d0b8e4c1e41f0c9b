"""Model configuration with the OpenAI field names (spec §1.1) and named presets."""
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List


@dataclass(frozen=True)
class ModelConfig:
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
    rms_norm_eps: float = 1e-5
    # Which layers use the sliding window; default: the even ones (spec §1.1).
    layer_types: List[str] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)])
        problems = []
        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.experts_per_token > self.num_experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) must be <= num_experts ({self.num_experts})")
        if len(self.layer_types) != self.num_hidden_layers or any(
                t not in ("sliding_attention", "full_attention") for t in self.layer_types):
            problems.append(f"layer_types must list 'sliding_attention'/'full_attention' for each of the "
                            f"{self.num_hidden_layers} layers, got {self.layer_types}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int:
        """Sliding window of `layer` (0 = full causal)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]


PRESETS: Dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    "notebook-demo": ModelConfig(num_hidden_layers=2, num_experts=8, experts_per_token=2, vocab_size=5000,
                                 hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=64, sliding_window=128,
                                 initial_context_length=512, rope_theta=10000.0, rope_scaling_factor=1.0),
}
