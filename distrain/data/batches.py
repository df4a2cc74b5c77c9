"""Batches outside the training loop (one fetch for inference and FLOP counting), device moves, (input, target)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from distrain.data.collate import CollateFn, collate


def fetch_batch(dataset: Dataset, indices: Sequence[int], collate_fn: Optional[CollateFn] = None) -> Any:
    """The samples at ``indices`` collated into one batch, in this process (the training loop uses the loader).

    Datasets that implement ``__getitems__`` (torch's batched-fetch protocol, as the built-ins do) return the
    whole batch at once; anything else is read sample by sample; lists of samples are collated as the loader does.
    """
    getitems = getattr(dataset, "__getitems__", None)
    fetched = getitems(list(indices)) if callable(getitems) else [dataset[i] for i in indices]
    return collate(fetched, collate_fn)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to ``device``, non-blocking (asynchronous from pinned memory).

    Any Mapping (dict, transformers' BatchEncoding) keeps its type where it can be rebuilt from a dict.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [move_to(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, Mapping):  # dict, transformers' BatchEncoding, any Mapping of a model's arguments
        moved_map = {k: move_to(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved_map)  # keep the type (a BatchEncoding stays one)
        except TypeError:
            return moved_map
    return batch


# The key pairs a Mapping sample may name its input and target by, in the order they are looked for.
SAMPLE_KEYS = (("input", "target"), ("x", "y"), ("inputs", "labels"))


def split_input_target(batch: Any) -> tuple:
    """(input, target) from a batch: a pair, or a Mapping with one of the SAMPLE_KEYS pairs."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for a, b in SAMPLE_KEYS:
            if a in batch and b in batch:
                return batch[a], batch[b]
    pairs = ", ".join(f"'{a}'/'{b}'" for a, b in SAMPLE_KEYS)
    got = f"a Mapping with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else \
        f"a batch of type {type(batch).__name__}"
    raise TypeError(f"each sample must be an (input, target) pair or a Mapping with one of the key pairs {pairs}; "
                    f"got {got}")
