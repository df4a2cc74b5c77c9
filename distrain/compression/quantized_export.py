"""Weight-only int8 export through torchao, stored as plain tensors in safetensors.

Every nn.Linear / nn.Conv* weight becomes int8 data + one float32 scale per output channel; the format
(``distrain-int8/1``) and its reading are in distrain.compression.int8_format, which needs no torchao.

Why not torchao's own tensors: its ``Int8Tensor`` (``quantize_(model, Int8WeightOnlyConfig())``) is a tensor
subclass, which safetensors cannot store and which only ``torch.load(weights_only=False)`` (unpickling code) or
torchao's own loaders read back, tied to its version. Plain int8 + scales load anywhere (safetensors, any framework)
with nothing to trust; torchao's affine primitives compute them (distrain.compression.int8_quant), the same function
train.qat=int8 trains through, so a QAT run's export holds exactly the weights it trained against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from safetensors.torch import save
from torch import nn

from distrain.compression.int8_format import SCALE_SUFFIX, describe_quantization
from distrain.compression.int8_quant import quantize_weight
from distrain.compression.selection import selected_weights
from distrain.compression.state import read_rank_file
from distrain.compression.torchao_api import torchao_api
from distrain.errors import UsageError

# (model description, where it came from) -> the built-in model it names, weights not loaded
ModelBuilder = Callable[[Dict[str, Any], str], nn.Module]


def quantize_state(model: nn.Module, weights: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``weights`` (of ``model``) with every Linear/Conv weight as int8 + scale; returns them and those names."""
    names = [name for name, _ in selected_weights(model)]
    if not names:
        raise UsageError(f"--quantize int8: the model ({type(model).__name__}) has no nn.Linear or nn.Conv layer, "
                         f"so there is no weight to quantize. Export it without --quantize.", key="--quantize")
    out = dict(weights)
    for name in names:
        out[name], out[name + SCALE_SUFFIX] = quantize_weight(weights[name], "--quantize int8", "--quantize")
    return out, names


def fp32_export_bytes(weights: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> int:
    """The size of the full-precision export of ``weights`` (serialised in memory, as `ckpt export` writes it)."""
    return len(save({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
                    metadata={"distrain": json.dumps(meta, indent=1)}))


def to_int8(weights: Dict[str, torch.Tensor], meta: Dict[str, Any], build: ModelBuilder
            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Export step of ``--quantize int8``: the built-in model's Linear/Conv weights as int8 + scales, and the
    description's ``quantization`` entry. A train.qat=int8 run's weights were trained against this very scheme.
    ``build``: the model a description names (``distrain.inference.predict.build_described``; passed in, because
    inference builds on the export that calls this step)."""
    fp32_bytes = fp32_export_bytes(weights, meta)
    quantized, names = quantize_state(build(meta, meta.get("source", "the checkpoint")), weights)
    version = torchao_api("--quantize int8", "--quantize").version
    return quantized, dict(meta, quantization=describe_quantization(names, fp32_bytes, version))


def with_sparsity(weights: Dict[str, torch.Tensor], meta: Dict[str, Any]
                  ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Export step of a pruned run: the pruned tensors (plain, their zeros permanent) and their sparsity, per tensor
    and in total, in the description; a run without train.prune passes through."""
    saved = read_rank_file(Path(meta.get("source", "")), 0) if meta.get("source") else None
    pruned = sorted((saved[1].get("prune") or {}).get("sizes", {})) if saved else []
    if not pruned:
        return weights, meta
    zeros = {name: int((weights[name] == 0).sum()) for name in pruned}
    sizes = {name: weights[name].numel() for name in pruned}
    report = {name: zeros[name] / sizes[name] for name in pruned}
    report["total"] = sum(zeros.values()) / max(1, sum(sizes.values()))
    return weights, dict(meta, sparsity=report)
