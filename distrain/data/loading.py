"""Turning index lists into batches, for built-in datasets (fast tensor gather) and any map-style Dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, default_collate


def fetch_batch(dataset: Dataset, indices: Sequence[int]) -> Any:
    """The samples at ``indices`` collated into one batch.

    Datasets that implement ``__getitems__`` (torch's batched-fetch protocol, as the built-ins do) return the
    whole batch at once; anything else is read sample by sample and collated with torch's default_collate.
    """
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        batch = getitems(list(indices))
        return batch if not isinstance(batch, list) else default_collate(batch)
    return default_collate([dataset[i] for i in indices])


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, Mapping):  # dict, transformers' BatchEncoding, any Mapping of a model's arguments
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def split_input_target(batch: Any) -> tuple:
    """(input, target) from a batch: a pair, or a dict with ``input``/``target`` (or ``x``/``y``) keys."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for a, b in (("input", "target"), ("x", "y"), ("inputs", "labels")):
            if a in batch and b in batch:
                return batch[a], batch[b]
    raise TypeError("each sample must be an (input, target) pair or a dict with 'input' and 'target' keys; "
                    f"got a batch of type {type(batch).__name__}")

