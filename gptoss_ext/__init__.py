"""gptoss_ext: native CPU and CUDA kernels for the GPT-OSS architecture, as PyTorch ops.

The kernels are registered as `torch.ops.gptoss_ext.*`; use the typed wrappers exported here
(from `gptoss_ext.ops`), which add autograd and fake-tensor support.
"""
import json as _json
import os as _os

from ._isa import missing_cpu_features as _missing_cpu_features

_here = _os.path.dirname(_os.path.abspath(__file__))
_info_path = _os.path.join(_here, "_build_info.json")
if not _os.path.exists(_info_path):
    raise ImportError("gptoss_ext is not built: run `pip install --no-build-isolation -e .` "
                      "in the repository (or `make test`)")
with open(_info_path) as _f:
    build_info = _json.load(_f)
_missing = _missing_cpu_features(build_info["cpu_isa"])
if _missing:
    raise ImportError(f"gptoss_ext._C was built for {build_info['cpu_isa']} but this CPU lacks "
                      f"{', '.join(_missing)}; rebuild here: pip install --no-build-isolation -e .")

import torch  # noqa: E402,F401  (loads libtorch before _C)

from . import _C  # noqa: E402,F401  (registers torch.ops.gptoss_ext.*)
from .kv_cache import KVCache  # noqa: E402
from .ops import (add_rms_norm, apply_rope, attention, attention_decode, kv_cache_append, linear, moe_combine,  # noqa: E402
                  moe_dispatch, moe_grouped_gemm, moe_mlp, moe_route, mxfp4_dequantize, mxfp4_quantize, rms_norm,
                  swiglu)
from .rope import RotaryEmbedding, yarn_inv_freq  # noqa: E402

__all__ = ["rms_norm", "add_rms_norm", "linear", "apply_rope", "attention", "kv_cache_append", "attention_decode", "KVCache", "moe_route",
           "moe_dispatch", "swiglu", "moe_grouped_gemm", "moe_combine", "mxfp4_dequantize", "mxfp4_quantize",
           "moe_mlp", "RotaryEmbedding", "yarn_inv_freq", "build_info", "has_cuda_kernels"]


def has_cuda_kernels() -> bool:
    """True when this build compiled the CUDA kernels (whether or not a GPU is present)."""
    return bool(build_info["cuda"])
