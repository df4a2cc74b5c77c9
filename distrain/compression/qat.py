"""Quantization-aware training through torchao: int8 weights, symmetric, one scale per output channel.

``prepare_qat`` swaps every nn.Linear for torchao's FakeQuantizedLinear (QATConfig, step "prepare") before the
strategy wraps or shards the model; the parameters keep their names, so checkpoints, exports and resumes are those
of the plain model. The fake quantizer is the same int8 per-channel scheme as the export's (Int8WeightOnlyConfig):
what QAT trains against is exactly what ``distrain ckpt export --quantize int8`` writes. Convolutions are left to
the export's post-training quantization (torchao's QAT swaps linear layers only). It is off before
``train.qat_start`` and deterministic, so `distrain verify` holds at any world size.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from distrain.compression.torchao_api import torchao_api
from distrain.errors import ConfigError
from distrain.models.meta_init import is_meta, materialise

PURPOSE = "train.qat=int8 (quantization-aware training)"


def fake_quant_config(api) -> object:
    """int8, symmetric, per output channel: the scheme of torchao's Int8WeightOnlyConfig."""
    return api.IntxFakeQuantizeConfig(torch.int8, granularity="per_channel")


def prepare_qat(model: nn.Module, train: DictConfig) -> nn.Module:
    """``model`` with fake-quantized linear layers when train.qat is int8 (in place), else as it is.

    A model built on the meta device is materialised on the CPU first (its eager values, distrain.models.meta_init):
    torchao's swap copies weights only from a real tensor.
    """
    if train.qat == "none":
        return model
    api = torchao_api(PURPOSE, "train.qat")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ConfigError(f"train.qat={train.qat}: the model ({type(model).__name__}) has no nn.Linear layer for "
                          f"torchao to fake-quantize. Use train.qat=none for this model.", key="train.qat")
    if is_meta(model):
        materialise(model, torch.device("cpu"))
    api.quantize_(model, api.QATConfig(weight_config=fake_quant_config(api), step="prepare"))
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer of ``model`` on or off (off before train.qat_start)."""
    for module in model.modules():
        quantizer = getattr(module, "weight_fake_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = enabled
