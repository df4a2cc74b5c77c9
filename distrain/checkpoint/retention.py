"""Retention: keep the last K checkpoints plus every one whose step is a multiple of M; delete the rest - of this
run's checkpoints only (another run's are never touched)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, List, Set

from distrain.checkpoint.paths import committed, trash_name


def steps_to_keep(steps: Iterable[int], keep_last: int, keep_every: int) -> Set[int]:
    """The steps retention keeps: the ``keep_last`` newest, and every multiple of ``keep_every`` (0 = none)."""
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return keep


def apply_retention(root: Path, keep_last: int, keep_every: int,
                    owned: Callable[[Path], bool] = lambda path: True) -> List[Path]:
    """Delete this run's (``owned``) committed checkpoints outside the kept set; returns what was deleted.

    Each victim is first renamed out of the committed namespace (one atomic rename), so a deletion cut short
    leaves a leftover that is never mistaken for a checkpoint, instead of a half-deleted one.
    """
    found = [(step, path) for step, path in committed(root) if owned(path)]
    keep = steps_to_keep([s for s, _ in found], keep_last, keep_every)
    deleted = []
    for step, path in found:
        if step in keep:
            continue
        trash = root / trash_name(step, uuid.uuid4().hex[:8])
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted
