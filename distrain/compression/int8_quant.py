"""The one int8 weight quantization distrain uses, through torchao's affine primitives: symmetric, narrow range
[-127, 127], one float32 scale per output channel (scale = max |row| / 127).

Narrow range rather than [-128, 127]: each channel's largest weight then lands exactly on the grid (127), not on a
rounding tie (127.5, with scale max/127.5) that float rounding sends to 127 on one machine and to 128 -> clamped,
gradient cut, on another. QAT trains through this very function, so its fake-quantized weights are bit for bit
what the export writes, and the same at any world size.
"""

from __future__ import annotations

from typing import Tuple

import torch

from distrain.compression.torchao_api import torchao_api

QMIN, QMAX = -127, 127


def quantize_weight(weight: torch.Tensor, purpose: str, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 data shaped like ``weight``, float32 scale per output channel); ``purpose``/``key`` name what asks,
    should torchao be missing."""
    api = torchao_api(purpose, key)
    block = (1, *weight.shape[1:])
    w = weight.detach().float()
    scale, zero = api.choose_qparams_affine(w, api.MappingType.SYMMETRIC, block, torch.int8, quant_min=QMIN,
                                            quant_max=QMAX, scale_dtype=torch.float32)
    q = api.quantize_affine(w, block, scale, zero, torch.int8, quant_min=QMIN, quant_max=QMAX)
    return q.contiguous(), scale.reshape(-1).contiguous()


def fake_quantize(weight: torch.Tensor, purpose: str, key: str) -> torch.Tensor:
    """``weight`` as its int8 values (quantized, then scaled back), with a straight-through gradient."""
    with torch.no_grad():
        q, scale = quantize_weight(weight, purpose, key)
        grid = (q.float() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
    return weight + (grid - weight).detach()
