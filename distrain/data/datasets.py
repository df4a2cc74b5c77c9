"""Built-in datasets: real digits (scikit-learn's copy of UCI), real text (this Python's own stdlib), synthetic
regression; and the readers of your own data on disk: token shards, image folders, Hugging Face datasets.

Each built-in returns a (train, eval) pair of map-style datasets with a ``spec`` that tells the model registry the
shapes (input size, classes, vocabulary) and the trainer the task (and so the default loss).
"""

from __future__ import annotations

import importlib.util
import string
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from distrain.config.options import Range, parse_options
from distrain.data.hf import HFRows, check_columns, infer_task, load, splits
from distrain.data.images import EVAL_DIRS, Augment, ImageFolder, scan
from distrain.data.tokens import open_token_windows
from distrain.errors import ConfigError, UsageError
from distrain.registry import Registry

# Typed options (data.kwargs) shared by several built-ins; each builder's signature declares the rest.
Seed = Annotated[int, Range(ge=0, lt=2**32)]
BlockSize = Annotated[int, Range(ge=1, note="the window length in tokens, e.g. 64")]


@dataclass(frozen=True)
class DataSpec:
    task: str  # classification | regression | lm
    input_shape: Tuple[int, ...] = ()
    num_classes: int = 0  # classification: number of classes; lm: vocabulary size
    output_dim: int = 0  # regression targets per sample
    extra: Dict[str, Any] = field(default_factory=dict)


class TensorPairDataset(Dataset):
    """(input, target) pairs held as two tensors; fetches a whole batch with one gather."""

    in_memory = True  # a batch is one gather: data.num_workers=null picks 0 (a worker would only add a copy)

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


def digits(eval_fraction: float = 0.2, split_seed: Seed = 1234) -> Tuple[TensorPairDataset, TensorPairDataset]:
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


def text(block_size: BlockSize = 64, max_chars: Annotated[int, Range(ge=1)] = 1_000_000, eval_fraction: float = 0.1,
         min_length: Annotated[int, Range(ge=0, note="0: windows of block_size without padding")] = 0
         ) -> Tuple[TensorPairDataset, TensorPairDataset]:
    """Character-level language modelling on the stdlib's source: windows of block_size, targets shifted by one.

    The eval split is the tail of the corpus (contiguous, so no eval window overlaps a training window).
    ``min_length`` > 0 makes variable-length sequences: window i keeps a seeded length in [min_length, block_size]
    and is padded to block_size after it, with PAD_ID inputs and targets of -100 (IGNORE_INDEX: no item of the
    loss). Right padding leaves a causal model's valid positions untouched.
    """
    if min_length > block_size:
        raise ConfigError(f"data.kwargs.min_length={min_length!r} is not allowed: it must be an integer from 1 to "
                          f"block_size={block_size} (the shortest sequence; the rest are padded), or 0 for windows "
                          f"of block_size without padding.", key="data.kwargs.min_length")
    ids = encode(stdlib_corpus(max_chars))
    n_windows = (len(ids) - 1) // block_size
    if n_windows < 2:
        raise ConfigError(f"data.kwargs.max_chars={max_chars!r} gives {len(ids)} characters, fewer than two windows of "
                          f"block_size={block_size}: raise max_chars or lower block_size.", key="data.kwargs.max_chars")
    cut = n_windows - max(1, int(round(n_windows * eval_fraction))) if eval_fraction > 0 else n_windows
    x = ids[:n_windows * block_size].view(n_windows, block_size)
    y = ids[1:n_windows * block_size + 1].view(n_windows, block_size)
    if min_length:
        x, y = _pad_after_lengths(x, y, min_length)
    spec = DataSpec(task="lm", input_shape=(block_size,), num_classes=len(CHARS),
                    extra={"block_size": block_size, "min_length": min_length})
    return TensorPairDataset(x[:cut], y[:cut], spec), TensorPairDataset(x[cut:], y[cut:], spec)


PAD_ID = CHAR_TO_ID[UNKNOWN]  # input id of padding positions (their targets are IGNORE_INDEX)
IGNORE_INDEX = -100  # a target that is no item of the loss (torch's and transformers' default ignore_index)


def _pad_after_lengths(x: torch.Tensor, y: torch.Tensor, min_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep a seeded length per window (the same at every world size and run seed) and pad the rest."""
    n, block = x.shape
    lengths = torch.randint(min_length, block + 1, (n,), generator=torch.Generator().manual_seed(4321))
    padding = torch.arange(block).unsqueeze(0) >= lengths.unsqueeze(1)
    return x.masked_fill(padding, PAD_ID), y.masked_fill(padding, IGNORE_INDEX)


def regression(num_samples: Annotated[int, Range(ge=2)] = 4096, dim: Annotated[int, Range(ge=1)] = 16,
               outputs: Annotated[int, Range(ge=1)] = 1, noise: Annotated[float, Range(ge=0)] = 0.1,
               seed: Seed = 0, eval_fraction: float = 0.2
               ) -> Tuple[TensorPairDataset, TensorPairDataset]:
    """Synthetic linear-plus-tanh regression, for MSE tests (the split is seeded with seed + 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=gen)
    w = torch.randn(dim, outputs, generator=gen) / dim ** 0.5
    y = torch.tanh(x @ w) + noise * torch.randn(num_samples, outputs, generator=gen)
    spec = DataSpec(task="regression", input_shape=(dim,), output_dim=outputs)
    train_idx, eval_idx = _split(num_samples, eval_fraction, seed + 1)
    return TensorPairDataset(x[train_idx], y[train_idx], spec), TensorPairDataset(x[eval_idx], y[eval_idx], spec)


def tokens(path: str = "", block_size: BlockSize = 64, eval_windows: Annotated[Optional[int], Range(ge=1)] = None,
           eval_fraction: float = 0.2) -> Tuple[Dataset, Optional[Dataset]]:
    """Memory-mapped token shards (``distrain data prepare``) in windows of block_size, targets shifted by one.

    The eval split is the shards' own (limited to eval_windows windows), else the tail eval_fraction of the windows.
    """
    if not path:
        raise ConfigError("data.name=tokens needs data.kwargs.path: a directory of token shards with an index.json "
                          "(make one with `distrain data prepare SRC --out DIR`).", key="data.kwargs.path")
    train, evaluation, index = open_token_windows(path, block_size, eval_fraction, eval_windows)
    if len(train) < 1:
        held = sum(shard.tokens for shard in index.splits["train"])
        raise ConfigError(f"data.kwargs.path={path!r} holds {held} train tokens, not one window of "
                          f"block_size={block_size} (+1): lower block_size or add data.", key="data.kwargs.block_size")
    spec = DataSpec(task="lm", input_shape=(block_size,), num_classes=index.vocab_size,
                    extra={"block_size": block_size})
    for ds in (train, evaluation):
        if ds is not None:
            ds.spec = spec  # type: ignore[attr-defined]
    return train, evaluation


def images(path: str = "", size: Annotated[int, Range(ge=1, note="pixels per side")] = 32,
           channels: Annotated[int, Range(one_of=(1, 3), note="1 grayscale, 3 RGB")] = 3,
           augment: Optional[Dict[str, Any]] = None, eval_fraction: float = 0.2, split_seed: Seed = 1234
           ) -> Tuple[Dataset, Optional[Dataset]]:
    """Image files in one folder per class (PATH/<class>/*.png, or PATH/train/<class> and PATH/eval/<class>),
    decoded with Pillow, resized to size x size, augmented per sample (training split only)."""
    if importlib.util.find_spec("PIL") is None:
        raise ConfigError("data.name=images needs Pillow to decode images: pip install 'distrain[data]'.",
                          key="data.name")
    root = Path(str(path)).expanduser()
    if not path or not root.is_dir():
        raise ConfigError(f"data.kwargs.path={path!r} is not a directory; data.name=images reads PATH/<class>/*.png "
                          f"(or PATH/train/<class>/... and PATH/eval/<class>/...).", key="data.kwargs.path")
    aug = Augment.from_kwargs(augment)
    eval_root = next((root / d for d in EVAL_DIRS if (root / d).is_dir()), None)
    files, labels, classes = scan(root / "train" if (root / "train").is_dir() else root)
    if not files:
        raise ConfigError(f"data.kwargs.path={path!r} holds no images in class folders (PATH/<class>/*.png).",
                          key="data.kwargs.path")
    spec = DataSpec(task="classification", input_shape=(channels, size, size), num_classes=len(classes),
                    extra={"classes": classes})
    if eval_root is not None:
        eval_files, eval_labels, eval_classes = scan(eval_root)
        eval_labels = [classes.index(eval_classes[i]) for i in eval_labels if eval_classes[i] in classes]
        train = ImageFolder(files, labels, classes, size, channels, aug, spec)
        evaluation = ImageFolder(eval_files, eval_labels, classes, size, channels, None, spec)
    else:
        train_idx, eval_idx = _split(len(files), eval_fraction, split_seed)
        train_idx, eval_idx = sorted(train_idx.tolist()), sorted(eval_idx.tolist())
        train = ImageFolder([files[i] for i in train_idx], [labels[i] for i in train_idx], classes, size, channels,
                            aug, spec)
        evaluation = ImageFolder([files[i] for i in eval_idx], [labels[i] for i in eval_idx], classes, size, channels,
                                 None, spec)
    return train, evaluation


def hf(path: str = "", split: str = "train", eval_split: Optional[str] = None, input: Optional[str] = None,
       target: Optional[str] = None, columns: Optional[List[str]] = None, task: Optional[str] = None,
       num_classes: Annotated[Optional[int], Range(ge=1, note="classes, or the vocabulary size")] = None, eval_fraction: float = 0.2, split_seed: Seed = 1234
       ) -> Tuple[Dataset, Optional[Dataset]]:
    """A Hugging Face dataset saved with save_to_disk: (input, target) column pairs, or rows as dicts of tensors.

    The eval split is eval_split (or the DatasetDict's validation/eval/test), else a seeded eval_fraction held out.
    """
    train_ds, eval_ds = splits(load(path), split, eval_split)
    check_columns(train_ds, input, target, columns)
    if eval_ds is None and eval_fraction > 0:
        train_idx, eval_idx = _split(len(train_ds), eval_fraction, split_seed)
        train_ds, eval_ds = train_ds.select(sorted(train_idx.tolist())), train_ds.select(sorted(eval_idx.tolist()))
    spec = None
    if input is not None:
        kind, classes, outputs = infer_task(train_ds, target, task, num_classes)  # type: ignore[arg-type]
        shape = tuple(train_ds.with_format("torch", columns=[input])[0][input].shape)
        spec = DataSpec(task=kind, input_shape=shape, num_classes=classes, output_dim=outputs,
                        extra={"block_size": shape[0]} if kind == "lm" and shape else {})
    make = lambda ds: HFRows(ds, input, target, columns, spec)  # noqa: E731
    return make(train_ds), (make(eval_ds) if eval_ds is not None and len(eval_ds) else None)


# data.name -> builder(eval_fraction, **data.kwargs) -> (train, eval or None); a user's own by its import path.
DATASETS = Registry("dataset", "data.name", "builder(eval_fraction=..., **kwargs) -> (train, eval)", check=callable,
                    hint=", or a map-style Dataset passed to distrain.Trainer(train_data=...)", entries={
                        "digits": digits, "text": text, "regression": regression, "tokens": tokens,
                        "images": images, "hf": hf})


def dataset_builder(name: str) -> Callable[..., Tuple[Dataset, Optional[Dataset]]]:
    """The builder registered as ``data.name`` (or a user's ``package.module:function``), else a ConfigError."""
    return DATASETS.resolve(name)


def build_datasets(name: str, kwargs: Dict[str, Any], eval_fraction: float
                   ) -> Tuple[Dataset, Optional[Dataset]]:
    """The (train, eval) pair of a built-in dataset, with errors that name the config key."""
    builder = dataset_builder(name)
    # The eval share is data.eval_fraction, not a kwarg of its own.
    kwargs = parse_options(builder, kwargs, "data.kwargs", f"dataset {name!r}", skip=("eval_fraction",))
    kwargs["eval_fraction"] = eval_fraction
    train, evaluation = builder(**kwargs)  # the options fit its signature: whatever it raises is its own
    return train, (evaluation if evaluation is not None and len(evaluation) else None)


def training_datasets(data: Any, train_data: Optional[Dataset], eval_data: Optional[Dataset]
                      ) -> Tuple[Dataset, Optional[Dataset]]:
    """The (train, eval) pair a Trainer uses: the caller's map-style datasets, checked, or else the built-in one
    that ``data`` (the config's data section) names."""
    if train_data is None:
        return build_datasets(data.name, data.kwargs, data.eval_fraction)
    if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
        raise ConfigError("train_data must be a map-style Dataset (with __getitem__ and __len__); got "
                          f"{type(train_data).__name__}.", key="train_data")
    if len(train_data) == 0:
        raise ConfigError("train_data is empty.", key="train_data")
    return train_data, eval_data


def render_digits(out: Path, size: int = 64, limit: int = 0) -> int:
    """Write scikit-learn's handwritten digits as PNG files: ``out/train/<digit>/<n>.png`` and ``out/eval/...`` (the
    built-in digits' own 80/20 split), each 8x8 scan upscaled to size x size with bicubic interpolation; at most
    ``limit`` per split (0: all). Real images on disk for examples, tests and benchmarks. Returns how many."""
    from PIL import Image  # lazy: Pillow is optional (distrain[data])

    if any(Path(out).glob("*/*/*.png")):
        raise UsageError(f"{out} already holds rendered digits; nothing is overwritten. Choose another directory.")
    train, evaluation = build_datasets("digits", {}, 0.2)
    written = 0
    for split, data in (("train", train), ("eval", evaluation)):
        for i in range(len(data) if not limit else min(limit, len(data))):
            pixels = (data.inputs[i, 0].numpy() * 255).astype(np.uint8)  # type: ignore[attr-defined]
            folder = Path(out) / split / str(int(data.targets[i]))  # type: ignore[attr-defined]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
            written += 1
    return written
