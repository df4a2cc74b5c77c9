"""Finding checkpoints: the newest valid one in a run, what a user-given path means, and listings for the CLI."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from distrain.checkpoint.paths import CHECKPOINTS, committed, is_checkpoint_dir, leftovers, read_latest
from distrain.checkpoint.manifest import problem, read_manifest
from distrain.env import detect
from distrain.errors import CheckpointError

PATH_HELP = ("a run directory (runs/NAME), its checkpoints/ directory, a checkpoint directory "
             "(runs/NAME/checkpoints/step_XXXXXXXX)")


def newest_valid(root: Path) -> Tuple[Optional[Path], List[Tuple[str, str]]]:
    """The newest committed checkpoint under ``root`` that passes its manifest (sizes and sha256), and the
    (name, reason) of every newer one that did not."""
    skipped: List[Tuple[str, str]] = []
    for _, path in reversed(committed(root)):
        reason = problem(path)
        if reason is None:
            return path, skipped
        skipped.append((path.name, reason))
    return None, skipped


def checkpoints_dir_of(path: Path) -> Path:
    """The checkpoints/ directory for a run directory, or ``path`` itself when it already is one."""
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def resume_candidates(resume: str, root: Path) -> Tuple[List[str], bool]:
    """Rank 0: the checkpoint paths ``train.resume`` may mean (``root``: this run's checkpoints), newest first, and
    whether the first must be valid (a checkpoint directory named itself)."""
    if resume == "auto":
        return [str(p) for _, p in reversed(committed(root))], False
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"train.resume={resume!r} does not exist. Use auto, never, or {PATH_HELP}.",
                              key="train.resume")
    if is_checkpoint_dir(path):
        return [str(path)], True
    return [str(p) for _, p in reversed(committed(checkpoints_dir_of(path)))], False


def resolve_checkpoint(path: Path, what: str = "PATH") -> Path:
    """A validated checkpoint directory from a run dir, a checkpoints dir or a checkpoint dir; CheckpointError if
    there is none (``what`` names the argument in the message).

    Falling back past invalid newer checkpoints is never silent: one line on stderr (rank 0) says which were
    skipped, why, and which one is used - as a resume says it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist; give {PATH_HELP}.", key=what)
    if is_checkpoint_dir(path):
        reason = problem(path)
        if reason is not None:
            raise CheckpointError(f"{what} {str(path)!r} is not a valid checkpoint: {reason}. Use another "
                                  f"checkpoint (`distrain ckpt ls RUN_DIR` lists them and says which are valid).",
                                  key=what)
        return path
    found, skipped = newest_valid(checkpoints_dir_of(path))
    if found is None:
        detail = (" Invalid: " + "; ".join(f"{n} ({r})" for n, r in skipped) + ".") if skipped else ""
        raise CheckpointError(f"{what} {str(path)!r} holds no valid checkpoint.{detail} Give {PATH_HELP}.", key=what)
    if skipped:
        _note(f"{path}: {describe_fallback(skipped, found)}")
    return found


def describe_skipped(skipped: List[Tuple[str, str]]) -> str:
    return ", ".join(f"{name} ({reason})" for name, reason in skipped)


def describe_fallback(skipped: List[Tuple[str, str]], used: Optional[Path]) -> str:
    """'skipped invalid checkpoint(s) A (why); falling back to B' - or '...; no valid checkpoint is left'."""
    return (f"skipped invalid checkpoint(s) {describe_skipped(skipped)}; "
            + (f"falling back to {used.name}" if used is not None else "no valid checkpoint is left"))


def _note(message: str) -> None:
    """One line on stderr, from rank 0 only (a tool may run on every rank of a torchrun job)."""
    try:
        speaks = detect().is_main
    except Exception:  # a half-set launcher environment: say it rather than not
        speaks = True
    if speaks:
        print(f"distrain: warning: {message}", file=sys.stderr)


@dataclass
class Listing:
    """One row of `distrain ckpt ls`."""

    name: str
    step: Optional[int]
    created: Optional[float]
    world_size: Optional[int]
    size_bytes: int
    problem: Optional[str]  # None: valid
    latest: bool


def list_checkpoints(root: Path, checksums: bool = True) -> List[Listing]:
    """Every committed checkpoint and leftover under ``root``, oldest first, each checked against its manifest."""
    latest = read_latest(root)
    rows: List[Listing] = []
    for step, path in committed(root):
        manifest = read_manifest(path) or {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        world = manifest.get("world_size")
        rows.append(Listing(path.name, step, manifest.get("created"), world, size, problem(path, checksums),
                            path.name == latest))
    for path in leftovers(root):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append(Listing(path.name, None, path.stat().st_mtime, None, size,
                            "uncommitted: a save that never finished (or a deletion cut short)", False))
    return rows

