"""Classifiers and regressors for small fixed-size inputs: an MLP and a CNN for the 8x8 digits."""

from __future__ import annotations

import math
from typing import Annotated

from torch import nn

from distrain.data.datasets import DataSpec
from distrain.config.options import Range
from distrain.models.registry import Size, register_flops, register_model


def _outputs(spec: DataSpec) -> int:
    return spec.num_classes if spec.task == "classification" else spec.output_dim


@register_model("mlp")
def mlp(spec: DataSpec, hidden: Size = 128, depth: Annotated[int, Range(ge=0, note="0: a linear model")] = 2
        ) -> nn.Module:
    """Flatten -> depth x (Linear, ReLU) -> Linear. Works on digits (classes) and regression (values)."""
    if spec.task not in ("classification", "regression"):
        raise ValueError("mlp needs classification or regression data (use lstm or gpt for text)")
    layers = [nn.Flatten()]
    width = math.prod(spec.input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, _outputs(spec)))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(spec: DataSpec, channels: Size = 32, hidden: Size = 128) -> nn.Module:
    """Two 3x3 conv layers, a 2x2 max-pool and two linear layers; sized for 1x8x8 digits."""
    if spec.task != "classification" or len(spec.input_shape) != 3:
        raise ValueError("cnn needs image classification data shaped (channels, height, width), e.g. digits")
    c, h, w = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * channels * (h // 2) * (w // 2), hidden), nn.ReLU(),
        nn.Linear(hidden, spec.num_classes),
    )


def sequential_flops(model: nn.Module, input_shape: tuple) -> float:
    """Training FLOPs per sample of a Sequential of Conv2d/MaxPool2d/Flatten/Linear layers (and activations).

    Each multiply-add counts 2 FLOPs forward and 4 backward (input and weight gradients), the usual 3x-forward
    convention of MFU; bias adds, activations and pooling are left out (they are not matmul work).
    """
    shape = tuple(input_shape)
    total = 0.0
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            _, h, w = shape
            kh, kw = layer.kernel_size
            oh = (h + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
            ow = (w + 2 * layer.padding[1] - layer.dilation[1] * (kw - 1) - 1) // layer.stride[1] + 1
            macs = layer.in_channels // layer.groups * layer.out_channels * kh * kw * oh * ow
            total += 6 * macs
            shape = (layer.out_channels, oh, ow)
        elif isinstance(layer, nn.MaxPool2d):
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            shape = (shape[0], shape[1] // k, shape[2] // k)
        elif isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, nn.Linear):
            total += 6 * layer.in_features * layer.out_features
            shape = (layer.out_features,)
    return total


@register_flops("mlp")
def mlp_flops(model: nn.Module, spec: DataSpec) -> float:
    return sequential_flops(model, spec.input_shape)


@register_flops("cnn")
def cnn_flops(model: nn.Module, spec: DataSpec) -> float:
    return sequential_flops(model, spec.input_shape)
