"""``train.precision`` (fp32 | bf16 | fp16) mapped onto torch's own mechanisms: autocast and GradScaler.

Strategies whose engine has a mixed-precision mechanism of its own use that instead: FSDP2 its
``MixedPrecisionPolicy``, DeepSpeed its ``bf16``/``fp16`` config sections, Accelerate its ``mixed_precision``.
What is shared is here: which dtype a precision means, the check that fp16 has a GPU, autocast for plain
modules, and the GradScaler that fp16 needs (its loss scale keeps small fp16 gradients from flushing to zero).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from distrain.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype that forward/backward run in for ``train.precision``."""
    return DTYPES[precision]


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse fp16 without a GPU: torch has no fp16 loss scaling for CPU tensors, and bf16 is the CPU's format."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA GPU (fp16 training relies on a GPU GradScaler), but "
                          f"this run is on {device.type}. Use train.precision=bf16 (CPU and GPU) or fp32, or run on "
                          f"a GPU.", key="train.precision")


def autocast(precision: str, device: torch.device) -> ContextManager:
    """torch.autocast to the precision's dtype (a no-op for fp32); master weights and optimizer stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))


def grad_scaler(precision: str, device: torch.device, sharded: bool = False) -> Optional[torch.amp.GradScaler]:
    """A dynamic loss scaler for fp16 (None otherwise).

    ``sharded`` picks torch's ShardedGradScaler, which all-reduces the found-inf flag: with FSDP each rank sees
    only its shard of the gradients, so an overflow on one rank must skip the step on every rank.
    """
    if precision != "fp16":
        return None
    if sharded:
        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)
