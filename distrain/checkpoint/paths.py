"""Where a checkpoint lives on disk, and how committed, temporary and pointer entries are named.

    <run_dir>/checkpoints/
        step_00000020/               a committed checkpoint (renamed into place only when complete)
            manifest.json            size and sha256 of every other file; written last, before the rename
            trainer_state.json       step, data position, config, versions, world size (JSON, never pickle)
            rng/rank<r>.json         each rank's RNG states
            dcp/                     torch.distributed.checkpoint shards (.metadata + one .distcp per rank)
            engine/                  instead of dcp/: an engine's own checkpoint (DeepSpeed)
            model.safetensors        engine checkpoints only: consolidated weights, our portable format
        step_00000030.tmp-3f2a9c1e/  a save in progress (or one that was killed): never read
        step_00000005.kept-9c1e3f2a/ another run's checkpoint that stood in this run's way: kept, never read
        latest                       the name of the newest committed checkpoint, replaced atomically
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"
DCP_DIR = "dcp"
ENGINE_DIR = "engine"
CONSOLIDATED = "model.safetensors"

_COMMITTED = re.compile(r"^step_(\d{8,})$")
_TEMPORARY = re.compile(r"^step_(\d{8,})\.(tmp|trash)-[0-9a-z]+$")


def step_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def temp_name(step: int, token: str) -> str:
    return f"{step_name(step)}.tmp-{token}"


def trash_name(step: int, token: str) -> str:
    return f"{step_name(step)}.trash-{token}"


def kept_name(step: int, token: str) -> str:
    """Where another run's checkpoint that stood in the way of this run's save is kept (never deleted, never read)."""
    return f"{step_name(step)}.kept-{token}"


def parse_step(name: str) -> Optional[int]:
    """The step of a committed checkpoint directory name, or None for anything else."""
    match = _COMMITTED.match(name)
    return int(match.group(1)) if match else None


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def committed(root: Path) -> List[Tuple[int, Path]]:
    """Committed checkpoint directories under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def leftovers(root: Path) -> List[Path]:
    """Temporary directories of saves that never committed (killed mid-write) or deletions that were cut short."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _TEMPORARY.match(p.name))


def remove_leftovers(root: Path) -> List[str]:
    """Delete the ``leftovers`` of ``root``; returns their names."""
    stale = leftovers(root)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [path.name for path in stale]


def read_latest(root: Path) -> Optional[str]:
    """The checkpoint name the ``latest`` pointer names, or None when there is no pointer."""
    try:
        return (root / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def write_latest(root: Path, name: str) -> None:
    """Point ``latest`` at ``name``: write a temporary file, then one atomic os.replace."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` looks like one checkpoint (committed or not), rather than a run or checkpoints dir."""
    return path.is_dir() and any((path / name).exists() for name in (MANIFEST, TRAINER_STATE, DCP_DIR, ENGINE_DIR))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest committed checkpoint of the run in ``run_dir`` (what ``latest`` names), or None."""
    root = checkpoints_root(run_dir)
    name = read_latest(root)
    return root / name if name and (root / name).is_dir() else None
