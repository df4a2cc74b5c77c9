"""Token shards on disk, memory-mapped: the nanoGPT / llm.c layout with a small JSON index beside it.

A shard directory holds ``index.json`` and flat binary files of uint16 or uint32 token ids (an optional header of
``offset`` bytes, as llm.c writes, is skipped). The index names every shard of every split with its token count,
largest id and (version 2, what ``distrain data prepare`` writes) the sha256 of the whole file and of its first
``HEAD_BYTES`` bytes::

    {"format": "distrain-tokens", "version": 2, "dtype": "uint16", "vocab_size": 257,
     "tokenizer": {"kind": "bytes", "eot": 256},
     "splits": {"train": [{"file": "train-000000.bin", "tokens": 1000000, "max_token": 256,
                           "sha256": "9f2c...", "head_sha256": "41d0..."}, ...],
                "eval": [...]}}

``TokenWindows`` reads one split as one stream (the shards in order) cut into windows of ``block_size + 1``
tokens: window i is input ``tokens[i*block_size : (i+1)*block_size]`` and the target shifted by one. Shards are
memory-mapped lazily in each process that reads (so DataLoader workers map them themselves and nothing is loaded
up front); each read checks its tokens against the vocabulary. At open every shard is checked against the index:
present, the size that its dtype and token count make, ids within the vocabulary by the index and by a spot
check of its first and last tokens, and its first ``HEAD_BYTES`` against their checksum. Anything wrong is a
DataError naming the file. The whole-file checksums are checked by ``distrain data verify`` (too slow for every
open of a large corpus). Shards without checksums (written before version 2, or by hand) are read all the same.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from distrain.data.staging import partial_dirs
from distrain.errors import DataError

INDEX = "index.json"
FORMAT = "distrain-tokens"
VERSION = 2  # 2 added the checksums "sha256" and "head_sha256"; version 1 indexes are read as they are
HEAD_BYTES = 1 << 16  # the bytes at a shard's start whose checksum every open checks
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPOT_CHECK_TOKENS = 65536  # tokens read (not mapped) from each end of a shard at open


def dtype_for(vocab_size: int) -> str:
    """The smallest shard dtype that holds ids below ``vocab_size``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    offset: int = 0  # header bytes before the first token
    max_token: Optional[int] = None  # the largest id, as the index records it
    sha256: Optional[str] = None  # of the whole file (None: an index written before checksums)
    head_sha256: Optional[str] = None  # of its first HEAD_BYTES bytes after the header


def head_digest(path: Path, offset: int = 0) -> str:
    """The sha256 of the first ``HEAD_BYTES`` bytes of a shard file after its ``offset``-byte header."""
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a whole file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class TokenIndex:
    root: Path
    dtype: str
    vocab_size: int
    tokenizer: Dict[str, Any]
    splits: Dict[str, List[Shard]]

    @property
    def checksummed(self) -> bool:
        """Whether the index records the checksums of every shard (written by a prepare of version 2 or later)."""
        return all(s.sha256 and s.head_sha256 for shards in self.splits.values() for s in shards)

    @property
    def itemsize(self) -> int:
        return np.dtype(DTYPES[self.dtype]).itemsize

    @classmethod
    def read(cls, root: Path, check: bool = True) -> "TokenIndex":
        """The index of the shard directory ``root``, every shard checked (unless not ``check``); a DataError naming
        the file otherwise."""
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            hint = (" It holds .bin files but no index: write index.json as described in the README (\"Token "
                    "shards\"), or create the shards with `distrain data prepare`." if any(root.glob("*.bin")) else
                    " Create token shards with `distrain data prepare SRC --out DIR`.")
            where = f"{root} has no {INDEX}" if root.is_dir() else (
                f"{root} is not a directory" if root.exists() else f"{root} does not exist")
            hint += unfinished_prepare(root)
            raise DataError(f"Token shards: {where}.{hint}", key="data.kwargs.path")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"Token shard index {path} cannot be read as JSON: {err}.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path} is not a distrain token index (its \"format\" must be {FORMAT!r}).")
        dtype, vocab = data.get("dtype"), data.get("vocab_size")
        if dtype not in DTYPES:
            raise DataError(f"{path} has dtype {dtype!r}; token shards are {' or '.join(DTYPES)}.")
        if not isinstance(vocab, int) or not 1 <= vocab <= np.iinfo(DTYPES[dtype]).max + 1:
            raise DataError(f"{path} has vocab_size {vocab!r}, which {dtype} shards cannot hold: it must be an "
                            f"integer from 1 to {np.iinfo(DTYPES[dtype]).max + 1}.")
        splits = data.get("splits")
        if not isinstance(splits, dict) or not splits.get("train"):
            raise DataError(f"{path} lists no shards for the \"train\" split (\"splits\": {{\"train\": [...]}}).")
        index = cls(root, dtype, vocab, dict(data.get("tokenizer") or {}),
                    {name: [_shard(root, path, name, entry) for entry in entries] for name, entries in splits.items()})
        for shards in index.splits.values():
            for shard in shards if check else ():
                index.check(shard)
        return index

    def check(self, shard: Shard) -> None:
        """The shard's size against the index, its ids against the vocabulary (recorded, and a spot check), then
        its head against its checksum."""
        if not shard.path.is_file():
            raise DataError(f"Token shard {shard.path} is missing: {self.root / INDEX} lists it with {shard.tokens:,} "
                            f"tokens. Restore the file, or prepare the shards again.")
        size = shard.path.stat().st_size
        expected = shard.offset + shard.tokens * self.itemsize
        if size != expected:
            other = "uint32" if self.dtype == "uint16" else "uint16"
            guess = ""
            if size - shard.offset == shard.tokens * np.dtype(DTYPES[other]).itemsize:
                guess = f" That is the size of {shard.tokens:,} {other} tokens: the shard's dtype is not the index's."
            elif (size - shard.offset) % self.itemsize == 0:
                guess = (f" It holds {(size - shard.offset) // self.itemsize:,} {self.dtype} tokens: the index does "
                         f"not match the file (truncated, or written by another run).")
            raise DataError(f"Token shard {shard.path} has {size:,} bytes, but {self.root / INDEX} says "
                            f"{shard.tokens:,} {self.dtype} tokens after a {shard.offset}-byte header, i.e. "
                            f"{expected:,} bytes.{guess}")
        if shard.max_token is not None and shard.max_token >= self.vocab_size:
            raise DataError(f"Token shard {shard.path} holds token id {shard.max_token} by {self.root / INDEX}, "
                            f"outside the vocabulary (vocab_size {self.vocab_size}: ids 0..{self.vocab_size - 1}).")
        for start in sorted({0, max(0, shard.tokens - SPOT_CHECK_TOKENS)}):
            ids = _read(shard, self.dtype, start, min(SPOT_CHECK_TOKENS, shard.tokens - start))
            self.check_ids(ids, shard, start)
        if shard.head_sha256 and head_digest(shard.path, shard.offset) != shard.head_sha256:
            raise DataError(f"Token shard {shard.path} does not match its checksum in {self.root / INDEX}: its first "
                            f"{HEAD_BYTES:,} bytes changed since it was written (overwritten or corrupted). Prepare "
                            f"the shards again; `distrain data verify {self.root}` checks every shard in full.")

    def check_ids(self, ids: np.ndarray, shard: Shard, start: int) -> None:
        """A DataError naming the shard and the position if any id in ``ids`` (read at ``start``) is outside the
        vocabulary."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            at = start + int(np.argmax(ids >= self.vocab_size))
            raise DataError(f"Token shard {shard.path} holds token id {int(_read(shard, self.dtype, at, 1)[0])} at "
                            f"position {at:,}, outside the vocabulary (vocab_size {self.vocab_size} in "
                            f"{self.root / INDEX}: ids 0..{self.vocab_size - 1}). The shard is corrupt or was written "
                            f"with another tokenizer: prepare it again.")


def _shard(root: Path, path: Path, split: str, entry: Any) -> Shard:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or \
            not isinstance(entry.get("tokens"), int) or entry["tokens"] < 0:
        raise DataError(f"{path}: split {split!r} has an entry {entry!r}; each shard must be "
                        f"{{\"file\": NAME, \"tokens\": COUNT}} (optionally \"offset\" and \"max_token\").")
    if Path(entry["file"]).name != entry["file"]:
        raise DataError(f"{path}: shard file {entry['file']!r} must be a plain file name inside {root}.")
    return Shard(root / entry["file"], entry["tokens"], int(entry.get("offset", 0)), entry.get("max_token"),
                 entry.get("sha256"), entry.get("head_sha256"))


def unfinished_prepare(root: Path) -> str:
    """A sentence about the temporary directory of a prepare into ``root`` that has not finished, or ''."""
    partial = partial_dirs(root)
    return (f" A `distrain data prepare` into it did not finish (or is still running): {partial[0]} holds its "
            f"unpublished shards; run the prepare (again) and wait for it to end." if partial else "")


def _read(shard: Shard, dtype: str, start: int, count: int) -> np.ndarray:
    """``count`` tokens from ``start`` with a plain read (nothing stays mapped: the open check must not grow RSS)."""
    item = np.dtype(DTYPES[dtype]).itemsize
    with open(shard.path, "rb") as f:
        f.seek(shard.offset + start * item)
        return np.frombuffer(f.read(count * item), dtype=DTYPES[dtype])


class TokenWindows(Dataset):
    """Windows of ``block_size`` tokens (and their targets, shifted by one) over a split's shards, by global index.

    ``first``/``count`` select a range of windows (the eval tail of a split without an eval split).
    """

    def __init__(self, index: TokenIndex, split: str, block_size: int, first: int = 0, count: Optional[int] = None):
        self.index, self.split, self.block_size = index, split, block_size
        self.shards = index.splits[split]
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards]).tolist()  # each shard's first stream position
        available = max(0, (self.starts[-1] - 1) // block_size)
        self.first = first
        self.count = available - first if count is None else count
        if self.first < 0 or self.count < 0 or self.first + self.count > available:
            raise ValueError(f"windows [{first}, {first + self.count}) outside the {available} of split {split!r}")
        self._maps: Optional[List[np.ndarray]] = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> Dict[str, Any]:  # a spawned worker maps the shards itself
        return {**self.__dict__, "_maps": None}

    def _mapped(self) -> List[np.ndarray]:
        if self._maps is None:  # an empty shard cannot be mapped (and holds nothing to read)
            dtype = DTYPES[self.index.dtype]
            self._maps = [np.memmap(s.path, dtype=dtype, mode="r", offset=s.offset, shape=(s.tokens,)) if s.tokens
                          else np.zeros(0, dtype=dtype) for s in self.shards]
        return self._maps

    def _tokens(self, window: int) -> np.ndarray:
        """block_size + 1 tokens of window ``window`` (global in the split), read across a shard boundary if needed."""
        start = (self.first + window) * self.block_size
        end = start + self.block_size + 1
        maps = self._mapped()
        k = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while start < end:
            local = start - self.starts[k]
            take = min(end - start, self.shards[k].tokens - local)
            part = maps[k][local:local + take]
            if part.size and int(part.max()) >= self.index.vocab_size:
                self.index.check_ids(np.asarray(part), self.shards[k], local)
            parts.append(part)
            start += take
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} out of range (0..{self.count - 1})")
        ids = torch.from_numpy(self._tokens(int(i)).astype(np.int64))
        return ids[:-1], ids[1:]

    def __getitems__(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """A whole micro-batch: one (B, block_size) int64 input and target tensor pair."""
        block = np.stack([self._tokens(int(i)) for i in indices]).astype(np.int64)
        ids = torch.from_numpy(block)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def open_token_windows(path: str, block_size: int, eval_fraction: float, eval_windows: Optional[int] = None
                       ) -> Tuple[TokenWindows, Optional[TokenWindows], TokenIndex]:
    """(train, eval, index) of a shard directory: the index's eval split if it has one, else the tail
    ``eval_fraction`` of the train split's windows."""
    index = TokenIndex.read(Path(os.path.expanduser(str(path))))
    if "eval" in index.splits and index.splits["eval"]:
        train = TokenWindows(index, "train", block_size)
        evaluation = TokenWindows(index, "eval", block_size)
        if eval_windows is not None:
            evaluation = TokenWindows(index, "eval", block_size, count=min(eval_windows, len(evaluation)))
    else:
        total = len(TokenWindows(index, "train", block_size))
        n_eval = int(round(total * eval_fraction)) if eval_fraction > 0 else 0
        if eval_windows is not None:
            n_eval = min(n_eval, eval_windows)
        train = TokenWindows(index, "train", block_size, count=total - n_eval)
        evaluation = TokenWindows(index, "train", block_size, first=total - n_eval, count=n_eval)
    return train, (evaluation if len(evaluation) else None), index
