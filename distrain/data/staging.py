"""A new directory written under a temporary name beside its final one and renamed into place when complete.

``distrain data prepare`` writes its shards here (like a checkpoint's ``.tmp-`` directory): training reads only
``--out``, which appears in one ``os.rename`` once every shard and the index are on disk, so a prepare killed
half-way leaves no ``--out`` at all, and two prepares into one ``--out`` cannot both succeed (the second rename
finds it there, not empty, and fails).

The temporary directory is ``.<out name>.partial-<id>`` in ``--out``'s parent (the same filesystem, so the rename is
atomic), and its writer holds an exclusive ``flock`` on it while it lives. The kernel drops that lock when the
writer dies, however it dies, so the next prepare tells a killed one's leftover (lock free: removed, with a note)
from one still writing (lock held: refused at once, instead of after the whole tokenization).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import List, Optional

from distrain.errors import UsageError

PARTIAL = ".partial-"  # in the name of a directory being written
_CREATING = ".creating-"  # its name until its writer holds the lock: never taken for a leftover


def partial_dirs(out: Path) -> List[Path]:
    """The temporary directories of prepares into ``out`` (running, or killed), beside it."""
    parent = out.parent if out.parent.is_dir() else None
    return sorted(parent.glob(f".{out.name}{PARTIAL}*")) if parent else []


def _try_lock(path: Path) -> Optional[int]:
    """An fd of ``path`` holding its exclusive lock, or None when another process holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def refuse_existing(out: Path) -> None:
    """A UsageError if ``out`` exists and is not an empty directory: a prepare never writes into or over anything.

    An empty directory is accepted (``mkdir -p DIR && distrain data prepare ... --out DIR`` is common, and it holds
    nothing to lose): the final rename replaces it.
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if out.is_symlink():
        what = "is a symbolic link (give the directory it should be, which must not exist yet)"
    elif (out / "index.json").exists():
        what = "already holds token shards (index.json)"
    elif out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        what = f"is a directory that is not empty ({len(names)} entries, e.g. {', '.join(names[:3])})"
    else:
        what = "exists and is not a directory"
    raise UsageError(f"--out {out} {what}; `distrain data prepare` writes a new directory and nothing is "
                     f"overwritten. Choose another --out directory (one that does not exist, or is empty), or remove "
                     f"that one yourself.")


class StagedDir:
    """The temporary directory of one prepare into ``out``: ``path`` to write into, then ``publish`` (or
    ``abort``). ``notes`` says what was found and cleaned on the way in."""

    def __init__(self, out: Path):
        self.out = Path(out)
        refuse_existing(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.notes = self._clean_leftovers()
        token = uuid.uuid4().hex[:12]
        creating = self.out.parent / f".{self.out.name}{_CREATING}{token}"
        creating.mkdir()
        fd = _try_lock(creating)
        assert fd is not None, creating  # a directory only this process knows of
        self._fd: Optional[int] = fd
        self.path = self.out.parent / f".{self.out.name}{PARTIAL}{token}"
        os.rename(creating, self.path)  # the lock stays with the directory

    def _clean_leftovers(self) -> List[str]:
        """Remove the temporary directories of killed prepares into ``out``; refuse if one is still writing."""
        notes = []
        for path in partial_dirs(self.out):
            fd = _try_lock(path)
            if fd is None:
                if path.exists():
                    raise UsageError(
                        f"Another `distrain data prepare` is writing {self.out} right now (its temporary directory "
                        f"{path} is locked by a live process); only one may. Wait for it to finish, or choose another "
                        f"--out.")
                continue  # it was published or removed meanwhile
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)
            notes.append(f"removed {path}, the unfinished temporary directory of an earlier prepare into {self.out} "
                         f"that was killed (its shards were never published)")
        return notes

    def publish(self) -> None:
        """Rename the directory to ``out`` in one step; a UsageError (the directory removed) if ``out`` appeared
        meanwhile, holding anything."""
        try:
            os.rename(self.path, self.out)  # replaces an empty directory only; never a non-empty one or a file
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            self.abort()
            raise UsageError(f"--out {self.out} appeared while this prepare ran (another `distrain data prepare` "
                             f"into it finished first?), and nothing is overwritten: this prepare's shards were "
                             f"removed. Use the shards in {self.out}, or prepare again into another --out.") from None
        _fsync_dir(self.out.parent)
        self._unlock()

    def abort(self) -> None:
        """Remove the temporary directory (a prepare that failed or was interrupted)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
