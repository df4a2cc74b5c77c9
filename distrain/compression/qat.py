"""Quantization-aware training through torchao: int8 weights, symmetric, one scale per output channel.

``prepare_qat`` lets torchao swap every nn.Linear for its FakeQuantizedLinear (QATConfig, step "prepare") before the
strategy wraps or shards the model; the parameters keep their names, so checkpoints, exports and resumes are those
of the plain model. Each layer's weight fake quantizer is then distrain's int8 one (distrain.compression.int8_quant,
torchao's affine primitives in the narrow range [-127, 127]): torchao's own int8 fake quantizer scales by max/127.5,
which puts every channel's largest weight on a rounding tie whose gradient float rounding keeps on one world size
and cuts on another, so `distrain verify` could not hold. What QAT trains against is exactly what
``distrain ckpt export --quantize int8`` writes. Convolutions are left to the export's post-training quantization
(torchao's QAT swaps linear layers only). QAT is off before ``train.qat_start``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from distrain.compression.int8_quant import fake_quantize
from distrain.compression.torchao_api import torchao_api
from distrain.errors import ConfigError
from distrain.models.meta_init import is_meta, materialise

PURPOSE = "train.qat=int8 (quantization-aware training)"


class Int8WeightFakeQuantizer(nn.Module):
    """A linear layer's weight as its int8 values, gradient straight through; ``enabled`` False passes it as is."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, PURPOSE, "train.qat") if self.enabled else weight


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
    swap = api.QATConfig(weight_config=api.IntxFakeQuantizeConfig(torch.int8, granularity="per_channel"),
                         step="prepare")
    api.quantize_(model, swap)
    for module in model.modules():
        if getattr(module, "weight_fake_quantizer", None) is not None:
            module.weight_fake_quantizer = Int8WeightFakeQuantizer()
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer of ``model`` on or off (off before train.qat_start)."""
    for module in model.modules():
        quantizer = getattr(module, "weight_fake_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = enabled
