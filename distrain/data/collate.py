"""From fetched samples to one batch: torch's default_collate, per key for Mapping samples, or the user's collate_fn.

A dataset's ``__getitems__`` may return a list of samples (torch's protocol; they are collated here) or an
already-collated batch (anything that is not a list, as the built-ins return), which is used as it is, unless
data.collate_fn is set: then a batch of stacked tensors is split back into its samples (views, no copy), so the
user's function receives the samples ``dataset[i]`` would give, whatever the dataset.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch.utils.data import default_collate

from distrain.errors import ConfigError, DataError, DistrainError

CollateFn = Callable[[List[Any]], Any]


def collate(fetched: Any, collate_fn: Optional[CollateFn] = None) -> Any:
    """One batch from what the dataset returned. Without a collate_fn a list of samples is collated and anything
    else is already a batch; a collate_fn always gets the list of samples, and its failure names data.collate_fn."""
    if collate_fn is None:
        return collate_samples(fetched) if isinstance(fetched, list) else fetched
    samples = fetched if isinstance(fetched, list) else split_batch(fetched)
    try:
        return collate_fn(samples)
    except DistrainError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's function: its traceback stays chained for the rank's log
        name = getattr(collate_fn, "__qualname__", None) or type(collate_fn).__name__
        raise DataError(f"data.collate_fn ({name}) failed on a micro-batch of {len(samples)} samples: "
                        f"{type(err).__name__}: {err}. It is called with the list of a micro-batch's samples (what "
                        f"dataset[i] returns, e.g. (input, target) pairs) and must return one batch.") from err


def split_batch(batch: Any) -> List[Any]:
    """The samples of a batch a dataset collated itself, as the built-ins' ``__getitems__`` does: a tuple of
    tensors stacked on dim 0 becomes one tuple per sample, what ``dataset[i]`` returns."""
    if isinstance(batch, tuple) and batch and all(isinstance(t, torch.Tensor) and t.dim() for t in batch):
        return list(zip(*(t.unbind(0) for t in batch)))
    raise DataError(f"data.collate_fn needs the samples of a micro-batch, but the dataset's __getitems__ returned "
                    f"one {type(batch).__name__}, not a list of samples: return a list of samples from __getitems__ "
                    f"(torch's protocol), or leave data.collate_fn unset.")


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
