"""Built-in datasets: real digits (scikit-learn's copy of UCI), real text (this Python's own stdlib), synthetic regression.

Each built-in returns a (train, eval) pair of ``TensorPairDataset`` with a ``spec`` that tells the model
registry the shapes (input size, classes, vocabulary) and the trainer the task (and so the default loss).
"""

from __future__ import annotations

import importlib.util
import inspect
import string
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from distrain.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    task: str  # classification | regression | lm
    input_shape: Tuple[int, ...] = ()
    num_classes: int = 0  # classification: number of classes; lm: vocabulary size
    output_dim: int = 0  # regression targets per sample
    extra: Dict[str, Any] = field(default_factory=dict)


class TensorPairDataset(Dataset):
    """(input, target) pairs held as two tensors; fetches a whole batch with one gather."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, spec: DataSpec):
        assert len(inputs) == len(targets)
        self.inputs, self.targets, self.spec = inputs, targets, spec

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]

    def __getitems__(self, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs[idx], self.targets[idx]


def _split(n: int, eval_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded train/eval split of n samples (independent of world size and run seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = int(round(n * eval_fraction))
    return order[n_eval:], order[:n_eval]


def digits(eval_fraction: float = 0.2, split_seed: int = 1234) -> Tuple[TensorPairDataset, TensorPairDataset]:
    """scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, 10 classes, pixels scaled to [0, 1]."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.name=digits needs scikit-learn, which ships the digits images. "
                          "Install it with `pip install scikit-learn`.", key="data.name")
    # Read the CSV scikit-learn ships rather than importing sklearn.datasets (about 1.5 s of start-up).
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(raw[:, :-1] / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(raw[:, -1].astype(np.int64))
    ds_spec = DataSpec(task="classification", input_shape=(1, 8, 8), num_classes=10)
    train_idx, eval_idx = _split(len(labels), eval_fraction, split_seed)
    return (TensorPairDataset(images[train_idx], labels[train_idx], ds_spec),
            TensorPairDataset(images[eval_idx], labels[eval_idx], ds_spec))


# A fixed vocabulary, so a model trained on one machine's stdlib reads text from any other.
VOCAB = "\n\t" + "".join(ch for ch in string.printable if ch not in "\n\t\r\x0b\x0c")
UNKNOWN = "\x00"
CHARS = VOCAB + UNKNOWN
CHAR_TO_ID = {ch: i for i, ch in enumerate(CHARS)}


def encode(text: str) -> torch.Tensor:
    unk = CHAR_TO_ID[UNKNOWN]
    return torch.tensor([CHAR_TO_ID.get(ch, unk) for ch in text], dtype=torch.long)


def decode(ids: Any) -> str:
    return "".join(CHARS[int(i)] for i in ids)


def stdlib_corpus(max_chars: int) -> str:
    """Real text: this Python's own standard-library source files, sorted by name, up to ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise ConfigError(f"data.name=text found no Python source files in the standard library at {root}. "
                          f"Use data.name=digits, or pass your own Dataset.", key="data.name")
    parts: List[str] = []
    total = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def text(block_size: int = 64, max_chars: int = 1_000_000, eval_fraction: float = 0.1
         ) -> Tuple[TensorPairDataset, TensorPairDataset]:
    """Character-level language modelling on the stdlib's source: windows of block_size, targets shifted by one.

    The eval split is the tail of the corpus (contiguous, so no eval window overlaps a training window).
    """
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ConfigError(f"data.kwargs.block_size={block_size!r} is not allowed: it must be a positive integer (the "
                          f"window length in characters, e.g. 64).", key="data.kwargs.block_size")
    ids = encode(stdlib_corpus(max_chars))
    n_windows = (len(ids) - 1) // block_size
    if n_windows < 2:
        raise ConfigError(f"data.kwargs.max_chars={max_chars!r} gives {len(ids)} characters, fewer than two windows of "
                          f"block_size={block_size}: raise max_chars or lower block_size.", key="data.kwargs.max_chars")
    cut = n_windows - max(1, int(round(n_windows * eval_fraction))) if eval_fraction > 0 else n_windows
    x = ids[:n_windows * block_size].view(n_windows, block_size)
    y = ids[1:n_windows * block_size + 1].view(n_windows, block_size)
    spec = DataSpec(task="lm", input_shape=(block_size,), num_classes=len(CHARS), extra={"block_size": block_size})
    return TensorPairDataset(x[:cut], y[:cut], spec), TensorPairDataset(x[cut:], y[cut:], spec)


def regression(num_samples: int = 4096, dim: int = 16, outputs: int = 1, noise: float = 0.1, seed: int = 0,
               eval_fraction: float = 0.2) -> Tuple[TensorPairDataset, TensorPairDataset]:
    """Synthetic linear-plus-tanh regression, for MSE tests."""
    for key, value, least in (("num_samples", num_samples, 2), ("dim", dim, 1), ("outputs", outputs, 1)):
        if not (isinstance(value, int) and value >= least):
            raise ConfigError(f"data.kwargs.{key}={value!r} is not allowed: it must be an integer of at least {least}.",
                              key=f"data.kwargs.{key}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=gen)
    w = torch.randn(dim, outputs, generator=gen) / dim ** 0.5
    y = torch.tanh(x @ w) + noise * torch.randn(num_samples, outputs, generator=gen)
    spec = DataSpec(task="regression", input_shape=(dim,), output_dim=outputs)
    train_idx, eval_idx = _split(num_samples, eval_fraction, seed + 1)
    return TensorPairDataset(x[train_idx], y[train_idx], spec), TensorPairDataset(x[eval_idx], y[eval_idx], spec)


DATASETS: Dict[str, Callable[..., Tuple[TensorPairDataset, TensorPairDataset]]] = {
    "digits": digits,
    "text": text,
    "regression": regression,
}


def dataset_builder(name: str) -> Callable[..., Tuple[TensorPairDataset, TensorPairDataset]]:
    """The builder registered as ``data.name``, or a ConfigError listing the built-ins."""
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset data.name={name!r}. Built-in datasets: {', '.join(DATASETS)}; "
                          f"or pass your own map-style Dataset to distrain.Trainer(train_data=...).", key="data.name")
    return DATASETS[name]


def build_datasets(name: str, kwargs: Dict[str, Any], eval_fraction: float
                   ) -> Tuple[TensorPairDataset, Optional[TensorPairDataset]]:
    """The (train, eval) pair of a built-in dataset, with errors that name the config key."""
    builder = dataset_builder(name)
    kwargs = dict(kwargs)
    accepted = [p for p in inspect.signature(builder).parameters if p != "eval_fraction"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"Config key(s) {', '.join('data.kwargs.' + k for k in unknown)} not accepted by dataset "
                          f"{name!r}. Allowed: {', '.join(accepted) or 'none'} (the eval share is data.eval_fraction).",
                          key=f"data.kwargs.{unknown[0]}")
    kwargs.setdefault("eval_fraction", eval_fraction)
    try:
        call = inspect.signature(builder).bind(**kwargs)
    except TypeError as err:  # the call itself does not fit; a TypeError raised inside the builder is its own
        raise ConfigError(f"data.kwargs {kwargs} do not fit dataset {name!r}: {err}.", key="data.kwargs") from None
    train, evaluation = builder(*call.args, **call.kwargs)
    return train, (evaluation if len(evaluation) else None)
