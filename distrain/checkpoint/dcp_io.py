"""Model and optimizer state through torch.distributed.checkpoint (DCP): every rank writes and reads its own shard.

The default format of a checkpoint's ``dcp/`` folder, used by every strategy whose engine has no format of its
own (``Strategy.save_checkpoint``); DeepSpeed overrides those methods with its engine's. Failures become our
errors: a storage problem (disk full, permissions) a StorageError naming the cause, anything else a
CheckpointError; a load reads only plain tensors and containers (distrain.checkpoint.safe_load).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as torch_dist

from distrain.checkpoint.safe_load import (SafeFileSystemReader, SafeLoadPlanner, explain_dcp_error, first_line,
                                          read_metadata)
from distrain.errors import CheckpointError, StorageError
from distrain.storage_errors import write_failure_hint

# DCP warns on every save/load without a process group even when asked for one with no_dist=True (strategy
# single); async saves warn from DCP's own thread, where a catch_warnings() context would not reach.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized",
                        category=UserWarning)


def save_state(state: Dict[str, Any], directory: Path, step: int, asynchronous: bool = False,
               group: Optional[Any] = None) -> Optional[Any]:
    """Write ``state`` (this rank's shards) into ``directory``; ``asynchronous``: in DCP's background thread,
    collectives on ``group``, returning its future (else None, once written)."""
    import torch.distributed.checkpoint as dcp  # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it

    writer = dcp.FileSystemWriter(str(directory))
    try:
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=no_dist())
        dcp.save(state, storage_writer=writer, no_dist=no_dist())
        return None
    except BaseException as err:  # DCP raises CheckpointException, a BaseException, on every rank
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise

        checkpoint = directory.parent
        hint = write_failure_hint(checkpoint)
        if hint:  # the storage said no: a runtime failure with its cause, not a cryptic writer message
            raise StorageError(f"Saving checkpoint step {step} into {checkpoint} failed because {hint}. The previous "
                               f"checkpoint stays the latest. (The writer said: {first_line(err)}.)") from None
        raise CheckpointError(f"Saving checkpoint step {step} into {checkpoint} failed: {first_line(err)}. The "
                              f"previous checkpoint stays the latest.") from None


def load_state(target: Dict[str, Any], directory: Path) -> None:
    """Fill ``target`` (the shapes of this rank's shards) in place from ``directory``."""
    import torch.distributed.checkpoint as dcp  # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it

    read_metadata(directory)  # refuse a tampered metadata file with a clear message, on every rank
    try:
        dcp.load(target, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(),
                 no_dist=no_dist())
    except BaseException as err:  # noqa: BLE001 - DCP wraps failures in CheckpointException (a BaseException)
        raise explain_dcp_error(err, directory.parent) from None


def no_dist() -> bool:
    """No process group (strategy single): DCP saves and loads in this one process."""
    return not (torch_dist.is_available() and torch_dist.is_initialized())

