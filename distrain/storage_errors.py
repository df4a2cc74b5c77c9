"""Why a write failed: a full file system or a file-size limit, told in words a user can act on."""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path
from typing import Optional, Union

# errnos that mean "the storage said no", not "the program is wrong".
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
LOW_SPACE_BYTES = 64 * 2**20


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def write_failure_hint(path: Union[str, os.PathLike]) -> Optional[str]:
    """The storage reason a write under ``path`` may have failed, or None when storage looks fine.

    Engines that write through their own C++ code (DCP's zip writer) report a short write as "unexpected pos"
    and lose the errno, so this looks at the two usual causes directly: the process's file-size limit and the
    free space of the file system.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        size = f"{soft / 2**20:.1f} MiB" if soft >= 2**20 else f"{soft} bytes"
        return (f"this process may not write files larger than {size} (RLIMIT_FSIZE, set with "
                f"`ulimit -f`); raise the limit (`ulimit -f unlimited`)")
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return None
    if usage.free < LOW_SPACE_BYTES:
        return (f"the file system holding {existing} is full ({usage.free / 2**20:.0f} MiB free of "
                f"{usage.total / 2**30:.1f} GiB); free space, or point run.dir at a larger disk")
    return None
