"""Hugging Face ``datasets``: a map-style Arrow dataset (a ``save_to_disk`` directory, or the object itself).

Rows come out as torch tensors (``with_format("torch")``). With ``input``/``target`` column names a sample is the
pair ``(row[input], row[target])``, which the built-in models and losses take; without, a sample is the row as a
dict of its columns (the Mapping batches that ``model(**batch)`` takes). Random access by index is Arrow's own,
memory-mapped from disk, so positions are exact and resumable like any map-style dataset's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from distrain.errors import ConfigError

EVAL_SPLITS = ("validation", "eval", "test")


class HFRows(Dataset):
    """Rows of a Hugging Face Dataset as (input, target) pairs or dicts of tensors; fetched a micro-batch at a time."""

    def __init__(self, ds: Any, input: Optional[str] = None, target: Optional[str] = None,
                 columns: Optional[Sequence[str]] = None, spec: Any = None):
        wanted = [input, target] if input is not None else (list(columns) if columns else None)
        self.ds = ds.with_format("torch", columns=wanted)
        self.input, self.target, self.spec = input, target, spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        row = self.ds[int(i)]
        return (row[self.input], row[self.target]) if self.input is not None else row

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """One Arrow read for the micro-batch, returned as a list of samples (so data.collate_fn applies)."""
        rows = self.ds[[int(i) for i in indices]]
        if self.input is not None:
            return list(zip(rows[self.input], rows[self.target]))
        return [{k: rows[k][j] for k in rows} for j in range(len(indices))]


def load(path: str) -> Any:
    """``datasets.load_from_disk(path)``, with the errors a config user can act on."""
    try:
        import datasets  # lazy: optional: Hugging Face datasets is optional (distrain[data])
    except ImportError:
        raise ConfigError("data.name=hf needs the Hugging Face datasets package: pip install 'distrain[data]'.",
                          key="data.name") from None
    if not path:
        raise ConfigError("data.name=hf needs data.kwargs.path: a directory written by a Dataset's (or "
                          "DatasetDict's) save_to_disk.", key="data.kwargs.path")
    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"data.kwargs.path={path!r} is not a directory (a Hugging Face save_to_disk "
                          f"directory was expected).", key="data.kwargs.path")
    try:
        return datasets.load_from_disk(str(Path(path).expanduser()))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.kwargs.path={path!r} is not a Hugging Face dataset directory: {err}",
                          key="data.kwargs.path") from None


def splits(obj: Any, split: str, eval_split: Optional[str]) -> Tuple[Any, Optional[Any]]:
    """(train, eval or None) from a DatasetDict (by name) or a Dataset (eval None: the caller holds some out)."""
    if not hasattr(obj, "keys"):
        if eval_split is not None:
            raise ConfigError(f"data.kwargs.eval_split={eval_split!r}, but the directory holds one Dataset, not a "
                              f"DatasetDict of splits.", key="data.kwargs.eval_split")
        return obj, None
    names = list(obj.keys())
    if split not in names:
        raise ConfigError(f"data.kwargs.split={split!r} is not a split of the dataset; it has {', '.join(names)}.",
                          key="data.kwargs.split")
    if eval_split is not None and eval_split not in names:
        raise ConfigError(f"data.kwargs.eval_split={eval_split!r} is not a split of the dataset; it has "
                          f"{', '.join(names)}.", key="data.kwargs.eval_split")
    eval_name = eval_split or next((n for n in EVAL_SPLITS if n in names), None)
    return obj[split], (obj[eval_name] if eval_name else None)


def check_columns(ds: Any, input: Optional[str], target: Optional[str], columns: Optional[Sequence[str]]) -> None:
    if (input is None) != (target is None):
        raise ConfigError("data.kwargs.input and data.kwargs.target go together: name both columns for (input, "
                          "target) samples, or neither for dict samples.", key="data.kwargs.input")
    for key, names in (("input", [input]), ("target", [target]), ("columns", list(columns or []))):
        missing = [n for n in names if n is not None and n not in ds.column_names]
        if missing:
            raise ConfigError(f"data.kwargs.{key}: column {missing[0]!r} is not in the dataset; its columns are "
                              f"{', '.join(ds.column_names)}.", key=f"data.kwargs.{key}")


def infer_task(ds: Any, target: str, task: Optional[str], num_classes: Optional[int]) -> Tuple[str, int, int]:
    """(task, num_classes, output_dim) for the built-in models and losses, from kwargs or the target's feature."""
    feature = ds.features[target]
    if task is None:
        if type(feature).__name__ == "ClassLabel":
            task = "classification"
        elif getattr(feature, "dtype", "").startswith("float"):
            task = "regression"
        else:
            raise ConfigError(f"data.kwargs.task is needed: the target column {target!r} ({feature}) is neither a "
                              f"ClassLabel nor floats. Set task: classification | regression | lm (and num_classes).",
                              key="data.kwargs.task")
    if task not in ("classification", "regression", "lm"):
        raise ConfigError(f"data.kwargs.task={task!r}; allowed: classification, regression, lm.",
                          key="data.kwargs.task")
    if task in ("classification", "lm"):
        num_classes = num_classes or getattr(feature, "num_classes", None)
        if not num_classes:
            raise ConfigError(f"data.kwargs.num_classes is needed for task {task} (the number of classes, or the "
                              f"vocabulary size).", key="data.kwargs.num_classes")
        return task, int(num_classes), 0
    sample = torch.as_tensor(ds.with_format("torch", columns=[target])[0][target])
    return task, 0, max(1, sample.numel())
