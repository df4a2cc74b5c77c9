"""The int8 export format ``distrain-int8/1``, read side: plain tensors in safetensors, no torchao needed.

Every quantized weight ``W`` (shape (out, ...)) is stored under its own name as int8 data ``Q`` of the same shape,
beside ``<name>.int8_scale``, one float32 scale per output channel: ``W ~= Q * scale`` (symmetric, no zero point).
Every other tensor is stored as it was. The description (the file's metadata) carries ``quantization``: this
format's name, the scheme, the quantized names and the size of the fp32 export of the same weights.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

QUANT_FORMAT = "distrain-int8/1"
SCALE_SUFFIX = ".int8_scale"
SCHEME = "int8 weight-only, symmetric [-127, 127], one float32 scale per output channel (max |row| / 127)"


def quantization_of(meta: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """An export description's quantization entry, or None for a full-precision export."""
    return meta.get("quantization")


def describe_quantization(names: List[str], fp32_bytes: int, version: str) -> Dict[str, Any]:
    """The quantization entry of an int8 export's description."""
    return {"format": QUANT_FORMAT, "scheme": SCHEME, "tensors": names, "fp32_bytes": fp32_bytes,
            "scale_suffix": SCALE_SUFFIX, "torchao": version}


def dequantize_state(weights: Dict[str, torch.Tensor], quantized: List[str]) -> Dict[str, torch.Tensor]:
    """Float32 weights back from int8 + scales: the values a weight-only int8 layer multiplies by."""
    out = {k: v for k, v in weights.items() if not k.endswith(SCALE_SUFFIX)}
    for name in quantized:
        scale = weights[name + SCALE_SUFFIX]
        out[name] = weights[name].float() * scale.reshape(-1, *[1] * (weights[name].dim() - 1))
    return out
