"""Writing token shards and their index (the layout ``distrain.data.tokens`` reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from distrain.data.tokens import DTYPES, FORMAT, INDEX, VERSION, dtype_for
from distrain.errors import UsageError


class ShardWriter:
    """Appends token ids to the shards of each split, starting a new file every ``shard_tokens`` tokens; ``close``
    writes index.json (to a temporary name, then renamed: a directory with an index is always complete)."""

    def __init__(self, out: Path, vocab_size: int, tokenizer: Dict[str, Any], shard_tokens: int = 100_000_000):
        self.out = Path(out)
        if (self.out / INDEX).exists():
            raise UsageError(f"{self.out} already holds token shards ({INDEX}); nothing is overwritten. Choose another "
                             f"--out directory, or remove that one yourself.")
        if shard_tokens < 1:
            raise UsageError(f"--shard-tokens {shard_tokens} must be a positive number of tokens per shard file.")
        self.out.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.tokenizer, self.shard_tokens = vocab_size, tokenizer, shard_tokens
        self.dtype = dtype_for(vocab_size)
        self.splits: Dict[str, List[Dict[str, Any]]] = {}
        self._open: Dict[str, Any] = {}

    def add(self, split: str, ids: np.ndarray) -> None:
        """Append ``ids`` (any integer array) to ``split``."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside 0..{self.vocab_size - 1}")
        ids = ids.astype(DTYPES[self.dtype], copy=False)
        while ids.size:
            entry, f = self._current(split)
            take = min(ids.size, self.shard_tokens - entry["tokens"])
            part = ids[:take]
            f.write(part.tobytes())
            entry["tokens"] += int(take)
            entry["max_token"] = max(entry["max_token"], int(part.max()))
            ids = ids[take:]

    def _current(self, split: str):
        shards = self.splits.setdefault(split, [])
        if split in self._open and shards[-1]["tokens"] < self.shard_tokens:
            return shards[-1], self._open[split]
        if split in self._open:
            self._open.pop(split).close()
        entry = {"file": f"{split}-{len(shards):06d}.bin", "tokens": 0, "max_token": 0}
        shards.append(entry)
        self._open[split] = open(self.out / entry["file"], "wb")
        return entry, self._open[split]

    def close(self) -> Dict[str, Any]:
        """Flush the shards, write index.json; returns the index."""
        for f in self._open.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._open.clear()
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "vocab_size": self.vocab_size,
                 "tokenizer": self.tokenizer, "splits": self.splits}
        tmp = self.out / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out / INDEX)
        return index

    def tokens(self, split: Optional[str] = None) -> int:
        return sum(e["tokens"] for name, shards in self.splits.items() if split in (None, name) for e in shards)


def random_shards(out: Path, vocab_size: int, tokens: int, shard_tokens: int = 2**27, seed: int = 0) -> Path:
    """A synthetic corpus of ``tokens`` uniform random ids (for benchmarks and memory tests), written in pieces of
    16 Mi tokens so that making a gigabyte never holds one."""
    writer = ShardWriter(out, vocab_size=vocab_size, tokenizer={"kind": "random", "seed": seed},
                         shard_tokens=shard_tokens)
    rng = np.random.default_rng(seed)
    for start in range(0, tokens, 2**24):
        writer.add("train", rng.integers(0, vocab_size, size=min(2**24, tokens - start),
                                         dtype=DTYPES[writer.dtype]))
    writer.close()
    return Path(out)
