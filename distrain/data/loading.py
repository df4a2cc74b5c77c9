"""Turning index lists into batches, for built-in datasets (fast tensor gather) and any map-style Dataset."""

from __future__ import annotations

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
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


# The key pairs a dict sample may name its input and target by, in the order they are looked for.
SAMPLE_KEYS = (("input", "target"), ("x", "y"), ("inputs", "labels"))


def split_input_target(batch: Any) -> tuple:
    """(input, target) from a batch: a pair, or a dict with one of the SAMPLE_KEYS pairs."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for a, b in SAMPLE_KEYS:
            if a in batch and b in batch:
                return batch[a], batch[b]
    pairs = ", ".join(f"'{a}'/'{b}'" for a, b in SAMPLE_KEYS)
    got = f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, dict) else \
        f"a batch of type {type(batch).__name__}"
    raise TypeError(f"each sample must be an (input, target) pair or a dict with one of the key pairs {pairs}; "
                    f"got {got}")

