"""From fetched samples to one batch: torch's default_collate, per key for Mapping samples, or the user's collate_fn.

A dataset's ``__getitems__`` may return a list of samples (torch's protocol; they are collated here) or an
already-collated batch (anything that is not a list, as the built-ins return), which is used as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch.utils.data import default_collate

from distrain.errors import ConfigError, DataError

CollateFn = Callable[[List[Any]], Any]


def collate(fetched: Any, collate_fn: Optional[CollateFn] = None) -> Any:
    """One batch from what the dataset returned: a list of samples is collated, anything else is already a batch."""
    if not isinstance(fetched, list):
        return fetched
    return (collate_fn or collate_samples)(fetched)


def collate_samples(samples: List[Any]) -> Any:
    """torch's default_collate, except that Mapping samples (dict, transformers' BatchEncoding) are collated key by
    key, with lists of numbers turned into tensors first (what a tokenizer returns without return_tensors)."""
    if samples and isinstance(samples[0], Mapping):
        return _collate_mappings(samples)
    return default_collate(samples)


def _collate_mappings(samples: List[Mapping]) -> Any:
    first = samples[0]
    batch = {}
    for key in first:
        values = [_as_tensor(s[key]) for s in samples]
        try:
            batch[key] = default_collate(values)
        except RuntimeError as err:
            shapes = sorted({tuple(v.shape) for v in values if isinstance(v, torch.Tensor)})
            raise DataError(f"The samples' '{key}' values cannot be stacked into one batch: they have different "
                            f"shapes {', '.join(str(list(s)) for s in shapes[:4])} ({err}). Pad them to one length "
                            f"in the dataset, or set data.collate_fn (Trainer(collate_fn=...)) to a function that "
                            f"pads, e.g. transformers' DataCollatorWithPadding.") from None
    try:
        return type(first)(batch)  # keep the sample's Mapping type (BatchEncoding(dict) works)
    except TypeError:
        return batch


def _as_tensor(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, bool)) for v in value):
        return torch.as_tensor(value)
    return value


def check_same_keys(samples: Sequence[Any], indices: Sequence[int]) -> None:
    """Mapping samples of one batch must have the same keys; otherwise a DataError naming two samples that differ."""
    if not samples or not isinstance(samples[0], Mapping):
        return
    keys = set(samples[0])
    for sample, index in zip(samples, indices):
        other = set(sample) if isinstance(sample, Mapping) else None
        if other != keys:
            got = "not a Mapping" if other is None else f"keys {sorted(other)}"
            raise DataError(f"Samples of one batch have inconsistent keys: sample {indices[0]} has keys "
                            f"{sorted(keys)} but sample {index} has {got}. Every sample must be a Mapping with the "
                            f"same keys (fill missing ones in the dataset), or set data.collate_fn to a function "
                            f"that handles the difference.")


def resolve_collate_fn(value: Any, key: str = "data.collate_fn") -> Optional[CollateFn]:
    """The collate function named by ``value``: a callable (Python API), a dotted path ``pkg.module:function`` or
    ``pkg.module.function`` (YAML), or None for the default."""
    if value is None or callable(value):
        return value
    path = str(value)
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{key}={path!r} is not a dotted path: write package.module:function (or "
                          f"package.module.function) for a function importable on every rank.", key=key)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own SyntaxError/NameError at import
        raise ConfigError(f"{key}={path!r} does not import: {type(err).__name__}: {err}. The module must be importable on every rank "
                          f"(installed, or on PYTHONPATH).", key=key) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}={path!r}: module {module_name!r} has no function {attr!r}.", key=key)
    return fn
