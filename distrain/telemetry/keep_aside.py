"""Keep a file of the run directory aside under a new name, never over an existing one (nothing is ever lost).

metrics.jsonl and trackers.json of an earlier run are kept as ``metrics.<mtime>.jsonl`` / ``trackers.<mtime>.json``
when a fresh run starts in the same directory, and the abandoned tail of a crashed attempt as
``metrics.abandoned.<mtime>.jsonl``. A plain rename replaces an existing target: two fresh starts within one second
would lose the first one's file. ``os.link`` refuses an existing name atomically, so the first free name wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def keep_aside(path: Path, like: Optional[Path] = None) -> Path:
    """Move ``path`` to ``<stem>.<mtime>[-N]<suffix>`` of ``like`` (default: ``path`` itself) in ``path``'s directory,
    taking the first name that does not exist yet; returns it."""
    like = like or path
    stamp = int(path.stat().st_mtime)
    for n in range(1000):
        target = path.with_name(f"{like.stem}.{stamp}{f'-{n}' if n else ''}{like.suffix}")
        try:
            os.link(path, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: the lock on the run directory rules out a race
            if target.exists():
                continue
            os.rename(path, target)
            return target
        os.unlink(path)
        return target
    raise FileExistsError(f"no free name to keep {path} aside")
