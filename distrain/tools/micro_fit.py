"""Which micro-batch `distrain plan --device-memory-gb` expects to fit, per strategy.

Activations are measured, not guessed: the config's model is built on the meta device (no memory) and runs a
forward of one sample there, and torch's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) add
up the bytes autograd keeps for backward; the output (whose gradient backward allocates) is added. A micro-batch
of m samples then needs about m times that on top of the strategy's model states and transient peak (the ZeRO
accounting in distrain.tools.planner). The estimate leaves out the allocator's fragmentation, the loss's own
buffers and train.activation_checkpointing (it measures the model as built), so ``micro_batch: auto`` may settle
one divisor lower; the plan is what to compare the size ``auto`` found with.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch.utils._pytree import tree_map

from distrain.data import build_datasets, fetch_batch
from distrain.models import build_model


def activation_bytes_per_sample(cfg: DictConfig) -> int:
    """Bytes autograd saves for backward in one sample's forward (plus the output), measured on the meta device."""
    train, _ = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.kwargs, train.spec)
    batch = tree_map(lambda t: t.to("meta") if torch.is_tensor(t) else t, fetch_batch(train, [0]))
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    saved = 0

    def pack(tensor: torch.Tensor) -> Any:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    outputs = [t for t in (out.values() if isinstance(out, dict) else [out]) if torch.is_tensor(t)]
    return saved + sum(t.numel() * t.element_size() for t in outputs)


def fitting_micro_batch(per_rank: int, device_bytes: float, states_peak: float, per_sample: int) -> Optional[int]:
    """The largest divisor of the per-rank share whose activations fit beside the model states (None: not even 1)."""
    room = device_bytes - states_peak
    fits = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d * per_sample <= room]
    return max(fits) if fits else None
