"""A fingerprint of the data a run trains and evaluates on, recorded in every checkpoint, so that a resume on other
data is noticed (``distrain.checkpoint.data_check`` compares them).

The data position is a pure function of the step, so a resume on a changed data set silently trains on other
samples than the run it continues. The fingerprint is cheap, never a pass over the data:

* token shards: the number of windows, the block size and every shard's name, token count and sha256 as the index
  records them (written by ``distrain data prepare``; an older index without checksums: names and counts only);
* any other data set (a built-in, or your own): its length, its ``spec`` where it has one, and the sha256 of a few
  items at fixed, evenly spaced indices. Items may be tensors, numpy arrays, PIL images, numbers, strings, and
  dicts, lists or tuples of them. An item read twice must hash the same: they are read outside the loader (no
  step, so distrain's own augmentation is off), with the global RNGs seeded per index and restored afterwards.
  Where an item cannot be hashed, or differs between two reads, the fingerprint is its length only, with a note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from distrain.data.seeding import derive_seed, preserved_global_rng, seed_globals
from distrain.data.tokens import TokenWindows

SAMPLES = 8  # items hashed per data set
_SEED = 0  # the seed the items are read under: fixed, so the fingerprint does not depend on run.seed


class Unhashable(TypeError):
    """An item holds something the fingerprint does not know how to hash."""


def fingerprint_data(train: Any, evaluation: Any, log: Optional[logging.Logger] = None) -> Dict[str, Any]:
    """{"train": ..., "eval": ...}: the fingerprints of the training and eval data (eval None without eval data);
    notes (a fallback to length only, shards without checksums) go to ``log``."""
    notes: List[str] = []
    result = {"train": fingerprint(train, "train", notes), "eval": fingerprint(evaluation, "eval", notes)}
    for note in notes if log is not None else ():
        log.info(f"data fingerprint: {note}")
    return result


def fingerprint(dataset: Any, role: str, notes: List[str]) -> Optional[Dict[str, Any]]:
    """The fingerprint of one data set (None for None); appends to ``notes`` what it could not cover."""
    if dataset is None:
        return None
    if isinstance(dataset, TokenWindows):
        return _token_fingerprint(dataset, role, notes)
    found: Dict[str, Any] = {"kind": "items", "length": len(dataset)}
    spec = getattr(dataset, "spec", None)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        found["spec"] = _json_safe(dataclasses.asdict(spec))
    try:
        found["samples"] = _sample_digests(dataset)
    except Exception as err:  # noqa: BLE001 - any failure of the user's items: length only, said why
        found["samples"] = None
        notes.append(f"the {role} data's items could not be fingerprinted ({type(err).__name__}: {err}); only its "
                     f"length ({len(dataset):,}) is checked when a run resumes")
    return found


def _token_fingerprint(windows: TokenWindows, role: str, notes: List[str]) -> Dict[str, Any]:
    index = windows.index
    if not index.checksummed:
        notes.append(f"the token shards in {index.root} were prepared before shards had checksums: a resume checks "
                     f"their names and token counts only (prepare them again to add checksums)")
    shards = [{"file": s.path.name, "tokens": s.tokens, **({"sha256": s.sha256} if s.sha256 else {})}
              for s in windows.shards]
    return {"kind": "tokens", "length": len(windows), "split": windows.split, "block_size": windows.block_size,
            "first": windows.first, "shards": shards}


def sample_indices(length: int) -> List[int]:
    """The indices whose items are hashed: evenly spaced from the first to the last."""
    return sorted({int(i) for i in np.linspace(0, length - 1, num=min(SAMPLES, length))}) if length else []


def _sample_digests(dataset: Any) -> Dict[str, Any]:
    """{"indices": [...], "sha256": [...]}: each item's digest; Unhashable if an item differs between two reads."""
    indices = sample_indices(len(dataset))
    digests = []
    with preserved_global_rng():  # reseeded per item below: the run's own draws stay as they were
        for i in indices:
            first, second = _item_digest(dataset, i), _item_digest(dataset, i)
            if first != second:
                raise Unhashable(f"item {i} differs between two reads (random without distrain's per-sample seed?)")
            digests.append(first)
    return {"indices": indices, "sha256": digests}


def _item_digest(dataset: Any, i: int) -> str:
    # Outside the loader's fetch context: a dataset recording the loader's fetches (distrain verify's) sees nothing.
    seed_globals(derive_seed(_SEED, -2, i))
    item = dataset[i]
    digest = hashlib.sha256()
    _feed(digest, item)
    return digest.hexdigest()


def _feed(digest: Any, item: Any) -> None:
    """Add ``item`` to ``digest``: its type tag, shape and bytes, recursively through containers."""
    if isinstance(item, torch.Tensor):
        data = item.detach().cpu().contiguous()
        digest.update(f"tensor:{data.dtype}:{tuple(data.shape)}:".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, (np.ndarray, np.generic)):
        data = np.ascontiguousarray(item)
        if data.dtype.hasobject:
            raise Unhashable("a numpy array of Python objects")
        digest.update(f"ndarray:{data.dtype.str}:{data.shape}:".encode() + data.tobytes())
    elif isinstance(item, Mapping):
        digest.update(f"mapping:{len(item)}:".encode())
        for key in sorted(item, key=repr):
            _feed(digest, key)
            _feed(digest, item[key])
    elif isinstance(item, (list, tuple)):
        digest.update(f"{type(item).__name__}:{len(item)}:".encode())
        for part in item:
            _feed(digest, part)
    elif item is None or isinstance(item, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(item).__name__}:{item!r};".encode())
    elif all(hasattr(item, name) for name in ("mode", "size", "tobytes")):  # a PIL image (PIL is not required)
        digest.update(f"image:{item.mode}:{tuple(item.size)}:".encode() + item.tobytes())
    else:
        raise Unhashable(f"an item holds a {type(item).__module__}.{type(item).__qualname__}")


def _json_safe(value: Any) -> Any:
    """A spec as JSON: tuples as lists, anything unusual as its repr."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

