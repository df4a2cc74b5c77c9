"""The parts of a checkpoint commit that grow with the world size W, measured in this process up to W = 1,024.

A W-rank checkpoint holds 2W + 2 files (a DCP shard and an RNG state per rank, DCP's metadata, the trainer state).
At a save every rank lists the directory to find its own files and hashes them, the digests (one small dict per
rank) are gathered, and rank 0 merges them, lists and sizes the directory and writes manifest.json with 2W + 2
entries. A synthetic checkpoint directory of W ranks' small files stands in for the real one (what is measured is
the per-file work, not the bytes), so the 1,024-rank numbers are measured here rather than extrapolated:

- ``rank_listing_s``: one rank finding and hashing its own files (``manifest.own_digests``);
- ``stat_listing_s``: the same listing with a stat of every file (how ``own_digests`` listed before), for scale;
- ``rank0_manifest_s``: rank 0's merge of every rank's digests and ``write_manifest``;
- ``gathered_bytes``: the pickled digests the gather delivers (to every rank: ``all_gather_object``).
"""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from benchmarks import stats
from distrain.checkpoint.manifest import hash_files, own_digests, write_manifest

SHARD_BYTES = 1024  # per synthetic file: the per-file cost is what grows with W, not the bytes


def make_checkpoint(directory: Path, world: int) -> List[str]:
    """A checkpoint directory's files for ``world`` ranks (small, synthetic); returns their relative paths."""
    rels = ["trainer_state.json", "dcp/.metadata"]
    rels += [rel for rank in range(world) for rel in (f"dcp/__{rank}_0.distcp", f"rng/rank{rank}.json")]
    for rel in rels:
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(rel.encode().ljust(SHARD_BYTES, b"\0"))
    return rels


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stats.summary(times)["median"]


def measure(world: int, repeats: int) -> Dict[str, Any]:
    """The W-dependent costs of one commit of a ``world``-rank checkpoint (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="distrain-bench-commit-") as tmp:
        directory = Path(tmp)
        rels = make_checkpoint(directory, world)
        last = world - 1  # any rank but 0 (rank 0 also owns the shared files)
        mine = own_digests(directory, last, world)
        digests = hash_files(directory, rels)
        per_rank = [{rel: digests[rel] for rel in rels if rel.endswith((f"__{r}_0.distcp", f"rank{r}.json"))}
                    for r in range(world)]

        def rank0_commit() -> None:
            merged: Dict[str, Any] = {}
            for rank_digests in per_rank:
                merged.update(rank_digests)
            write_manifest(directory, merged, step=1, world_size=world)

        return {"world": world, "files": len(rels),
                "rank_listing_s": _median_seconds(lambda: own_digests(directory, last, world), repeats),
                "stat_listing_s": _median_seconds(
                    lambda: [p for p in sorted(directory.rglob("*")) if p.is_file()], repeats),
                "rank0_manifest_s": _median_seconds(rank0_commit, repeats),
                "gathered_bytes": world * len(pickle.dumps((mine, None))),
                "manifest_bytes": (directory / "manifest.json").stat().st_size}


def run(worlds: List[int], repeats: int) -> List[Dict[str, Any]]:
    return [measure(world, repeats) for world in worlds]
