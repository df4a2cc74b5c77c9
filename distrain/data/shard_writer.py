"""Writing token shards and their index (the layout ``distrain.data.tokens`` reads), into a new directory that
appears whole or not at all (``distrain.data.staging``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from distrain.data.staging import StagedDir
from distrain.data.tokens import DTYPES, FORMAT, INDEX, VERSION, dtype_for, head_digest
from distrain.errors import UsageError


class ShardWriter:
    """Appends token ids to the shards of each split, starting a new file every ``shard_tokens`` tokens, into a
    temporary directory beside ``out``; ``close`` writes index.json with every shard's checksums and renames the
    directory to ``out`` (``abort`` removes it). ``out`` must not exist (or be empty)."""

    def __init__(self, out: Path, vocab_size: int, tokenizer: Dict[str, Any], shard_tokens: int = 100_000_000):
        self.out = Path(out)
        if shard_tokens < 1:
            raise UsageError(f"--shard-tokens {shard_tokens} must be a positive number of tokens per shard file.")
        self.staged = StagedDir(self.out)
        self.dir = self.staged.path  # where the files go until close()
        self.notes = self.staged.notes
        self.vocab_size, self.tokenizer, self.shard_tokens = vocab_size, tokenizer, shard_tokens
        self.dtype = dtype_for(vocab_size)
        self.splits: Dict[str, List[Dict[str, Any]]] = {}
        self._open: Dict[str, Any] = {}
        self._hash: Dict[str, Any] = {}  # the running sha256 of each split's open shard

    def add(self, split: str, ids: np.ndarray) -> None:
        """Append ``ids`` (any integer array) to ``split``."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside 0..{self.vocab_size - 1}")
        ids = ids.astype(DTYPES[self.dtype], copy=False)
        while ids.size:
            entry, f = self._current(split)
            take = min(ids.size, self.shard_tokens - entry["tokens"])
            part = ids[:take].tobytes()
            f.write(part)
            self._hash[split].update(part)
            entry["tokens"] += int(take)
            entry["max_token"] = max(entry["max_token"], int(ids[:take].max()))
            ids = ids[take:]

    def _current(self, split: str):
        shards = self.splits.setdefault(split, [])
        if split in self._open and shards[-1]["tokens"] < self.shard_tokens:
            return shards[-1], self._open[split]
        if split in self._open:
            self._finish(split)
        entry = {"file": f"{split}-{len(shards):06d}.bin", "tokens": 0, "max_token": 0}
        shards.append(entry)
        self._open[split] = open(self.dir / entry["file"], "wb")
        self._hash[split] = hashlib.sha256()
        return entry, self._open[split]

    def _finish(self, split: str) -> None:
        """Close the split's open shard (on disk) and record its checksums."""
        f, entry = self._open.pop(split), self.splits[split][-1]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        entry["sha256"] = self._hash.pop(split).hexdigest()
        entry["head_sha256"] = head_digest(self.dir / entry["file"])  # just written: read from the page cache

    def close(self) -> Dict[str, Any]:
        """Finish the shards, write index.json and publish the directory as ``out``; returns the index."""
        for split in list(self._open):
            self._finish(split)
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "vocab_size": self.vocab_size,
                 "tokenizer": self.tokenizer, "splits": self.splits}
        with open(self.dir / INDEX, "w") as f:
            f.write(json.dumps(index, indent=1))
            f.flush()
            os.fsync(f.fileno())
        self.staged.publish()
        return index

    def abort(self) -> None:
        """Drop everything written: nothing appears at ``out``."""
        for f in self._open.values():
            f.close()
        self._open.clear()
        self.staged.abort()

    def tokens(self, split: Optional[str] = None) -> int:
        return sum(e["tokens"] for name, shards in self.splits.items() if split in (None, name) for e in shards)


def random_shards(out: Path, vocab_size: int, tokens: int, shard_tokens: int = 2**27, seed: int = 0) -> Path:
    """A synthetic corpus of ``tokens`` uniform random ids (for benchmarks and memory tests), written in pieces of
    16 Mi tokens so that making a gigabyte never holds one."""
    writer = ShardWriter(out, vocab_size=vocab_size, tokenizer={"kind": "random", "seed": seed},
                         shard_tokens=shard_tokens)
    rng = np.random.default_rng(seed)
    try:
        for start in range(0, tokens, 2**24):
            writer.add("train", rng.integers(0, vocab_size, size=min(2**24, tokens - start),
                                             dtype=DTYPES[writer.dtype]))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return Path(out)
