"""gptoss: the GPT-OSS model library built on the gptoss_ext native ops."""
from .config import ModelConfig, PRESETS

__all__ = ["ModelConfig", "PRESETS"]
