"""gptoss: the GPT-OSS model library built on the gptoss_ext native ops."""
from .checkpoint import (checkpoint_nbytes, expected_shapes, hf_to_openai, load_state_dict, openai_to_hf,
                         parameter_count, save_checkpoint)
from .config import PRESETS, ModelConfig
from .cuda_graph import CUDAGraphDecoder
from .model import Transformer

__all__ = ["CUDAGraphDecoder", "ModelConfig", "PRESETS", "checkpoint_nbytes", "expected_shapes", "hf_to_openai", "load_state_dict",
           "openai_to_hf", "parameter_count", "save_checkpoint", "Transformer"]
