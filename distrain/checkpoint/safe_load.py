"""Reading DCP checkpoints without ever unpickling code.

DCP stores two kinds of pickled data: its ``.metadata`` file (read with plain ``pickle.load`` by torch's own
FileSystemReader) and non-tensor values (read with ``torch.load(weights_only=False)`` by the default load
planner). Both are replaced here: metadata goes through an unpickler that only admits DCP's own metadata
classes, and non-tensor values through ``torch.load(weights_only=True)``. A checkpoint that carries anything
else (a pickle payload that would run code) is refused with a CheckpointError before any of it executes.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from distrain.errors import CheckpointError

METADATA_FILE = ".metadata"


def _allowed_globals() -> Set[Tuple[str, str]]:
    """The only globals a DCP ``.metadata`` pickle may name: DCP's metadata records and torch value types."""
    allowed = {(dcp_metadata.__name__, name) for name, obj in vars(dcp_metadata).items()
               if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    allowed |= {("torch", name) for name, obj in vars(torch).items() if isinstance(obj, (torch.dtype, torch.layout,
                                                                                           torch.memory_format))}
    allowed |= {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                               "PureWindowsPath")}
    return allowed


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file holds pickled code (or objects outside the allowed plain data) and was refused."""


class _MetadataUnpickler(pickle.Unpickler):
    allowed = _allowed_globals()

    def __init__(self, file: Any, origin: str):
        super().__init__(file)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafeCheckpoint(
                f"Refused to load {self.origin}: it asks to import {module}.{name}, which is not part of a "
                f"torch.distributed.checkpoint metadata file. distrain never unpickles code from a checkpoint; "
                f"this file was tampered with or written by something else. Delete it, or resume from another "
                f"checkpoint (train.resume=PATH).")
        return super().find_class(module, name)


def read_metadata(dcp_dir: Path) -> Metadata:
    """DCP's metadata (tensor names, shapes, dtypes, shard locations) read through the restricted unpickler."""
    path = Path(dcp_dir) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"Checkpoint metadata {path} cannot be read: {err.strerror or err}.") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), str(path)).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated or garbled pickle stream
        raise CheckpointError(f"Checkpoint metadata {path} is not a valid DCP metadata file: "
                              f"{type(err).__name__}: {err}.") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"Checkpoint metadata {path} holds a {type(metadata).__name__}, not DCP Metadata.")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the metadata read through the restricted unpickler (tensors already load
    with ``weights_only=True`` in torch's reader)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        path = Path(self.fs.concat_path(self.path, name))
        metadata = read_metadata(path.parent) if rank is None else _read_rank_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _read_rank_metadata(path: Path) -> Metadata:
    return _MetadataUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()


def safe_torch_load(value: io.BytesIO, origin: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers/numbers/strings only."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message goes on to explain how to load unsafely; name only what was refused.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it asks to import {found.group(1)}" if found else "it is not plain data"
        raise UnsafeCheckpoint(
            f"Refused to load {origin}: {what}; a checkpoint value may only be tensors, numbers, strings, lists "
            f"and dicts. distrain loads checkpoints with weights_only=True and never unpickles code; this "
            f"checkpoint was tampered with or written by something else.") from None


class _SafeBytesMixin:
    """Non-tensor values (optimizer hyper-parameters, step counters) loaded with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint._traverse import set_element

        obj = safe_torch_load(value, f"checkpoint value {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytesMixin, DefaultLoadPlanner):
    """DCP's default load planner (in-place, resharding) with safe non-tensor loading."""


class SafeFullLoadPlanner(_SafeBytesMixin, _EmptyStateDictLoadPlanner):
    """Builds the state dict from the metadata (no model needed): DCP's format-utility path, made safe."""


def load_full_state(dcp_dir: Path, keys: Optional[Set[str]] = None) -> Dict[str, Any]:
    """The full (unsharded) state in a DCP checkpoint, in one process and without a process group.

    ``keys`` limits it to top-level entries (e.g. {"model"}), so exporting weights skips the optimizer.
    """
    # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: Dict[str, Any] = {}
    read_metadata(dcp_dir)  # refuse an unsafe metadata file with a clean message before DCP touches it
    try:
        _load_state_dict(state, storage_reader=SafeFileSystemReader(str(dcp_dir)),
                         planner=SafeFullLoadPlanner(keys=keys), no_dist=True)
    except BaseException as err:  # DCP wraps failures in CheckpointException, a BaseException
        raise explain_dcp_error(err, dcp_dir) from None
    return state


def explain_dcp_error(err: BaseException, where: Path) -> BaseException:
    """A CheckpointError for a DCP failure: our own refusal if one is inside, else the first line of the cause."""
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return err
    found = _find_checkpoint_error(err)
    if found is not None:
        return CheckpointError(str(found))
    return CheckpointError(f"Checkpoint {where} could not be loaded: {first_line(err)}")


def first_line(err: BaseException) -> str:
    """The line of an exception's message that says what went wrong (DCP wraps each rank's cause in a traceback:
    the last line that is not indented)."""
    lines = [line for line in str(err).strip().splitlines() if line and not line.startswith(" ")]
    return lines[-1] if lines else type(err).__name__


def _find_checkpoint_error(err: Any, depth: int = 0) -> Optional[CheckpointError]:
    if depth > 5 or err is None:
        return None
    if isinstance(err, CheckpointError):
        return err
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            found = _find_checkpoint_error(inner, depth + 1)
            if found is not None:
                return found
    return _find_checkpoint_error(err.__cause__ or err.__context__, depth + 1) if isinstance(err, BaseException) else None
