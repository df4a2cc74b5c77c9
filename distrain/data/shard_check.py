"""`distrain data verify DIR`: every token shard read in full and checked against the sha256 in its index.

Opening shards for training checks only what is cheap (sizes, the first ``HEAD_BYTES`` against their checksum, a
spot check of ids); this reads every byte, for a corpus copied between machines or a disk in doubt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from distrain.data.tokens import INDEX, TokenIndex, file_digest
from distrain.errors import CorruptDataError, DataError


@dataclass
class Verified:
    root: Path
    shards: int
    tokens: int
    unchecked: int  # shards without a checksum in the index (written before checksums): sizes and ids only

    def describe(self) -> str:
        line = (f"distrain data verify: {self.root}: {self.shards} shard(s), {self.tokens:,} tokens, every size "
                f"and id range as {INDEX} says")
        if self.unchecked == self.shards:
            return (line + f"; {INDEX} records no checksums (written by a prepare before checksums were added), so "
                    f"their contents could not be checked: prepare them again to add checksums.")
        return line + (f", every sha256 matches" + (f" ({self.unchecked} shard(s) without one)."
                                                     if self.unchecked else "."))


def verify_shards(root: Path, progress: Optional[bool] = None) -> Verified:
    """Check every shard of ``root`` in full; a CorruptDataError (exit 1) naming the first bad shard, a DataError
    (exit 2) if ``root`` is not a shard directory. ``progress`` None shows a bar on a terminal only."""
    index = TokenIndex.read(Path(root), check=False)
    shards = [shard for split in index.splits.values() for shard in split]
    size = sum(s.path.stat().st_size for s in shards if s.path.is_file())
    with tqdm(total=size, unit="B", unit_scale=True, desc="verifying", dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar:
        for shard in shards:
            try:
                index.check(shard)
            except DataError as err:
                raise CorruptDataError(str(err), key=str(shard.path)) from None
            if shard.sha256 and file_digest(shard.path) != shard.sha256:
                raise CorruptDataError(
                    f"Token shard {shard.path} fails its sha256 checksum in {index.root / INDEX}: its bytes changed "
                    f"since it was written (corrupted, or overwritten by another prepare). Training on it would read "
                    f"wrong tokens: prepare the shards again.", key=str(shard.path))
            bar.update(shard.path.stat().st_size)
    return Verified(index.root, len(shards), sum(s.tokens for s in shards),
                    unchecked=sum(1 for s in shards if not s.sha256))
