"""Which weights compression touches: every nn.Linear / nn.Conv* weight by default, plus or minus globs on
parameter names. Embeddings and norms are never touched unless a glob names them."""

from __future__ import annotations

import fnmatch
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

# Layers whose weight is a matmul / convolution kernel: what magnitude pruning and int8 weight quantization suit.
WEIGHT_LAYERS = (nn.Linear, _ConvNd)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def selected_weights(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
                     ) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every Linear/Conv weight and every parameter an ``include`` glob names, less those an
    ``exclude`` glob names; in the model's parameter order (the same on every rank)."""
    default = {id(m.weight) for m in model.modules() if isinstance(m, WEIGHT_LAYERS)
               and isinstance(getattr(m, "weight", None), torch.Tensor)}
    return [(name, p) for name, p in model.named_parameters()
            if (id(p) in default or _matches(name, include)) and not _matches(name, exclude)]

