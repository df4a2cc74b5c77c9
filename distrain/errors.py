"""Errors a user can act on. The CLI turns each into one paragraph and an exit code."""

from __future__ import annotations

from typing import Optional


class DistrainError(Exception):
    """Base of every error distrain raises on purpose; ``exit_code`` is what the CLI exits with: 2 for the user's
    mistake (their input), 1 for a runtime failure. A subclass states its own in its class line
    (``class X(DistrainError, exit_code=2)``), or keeps its parent's."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: Optional[int] = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


class ConfigError(DistrainError, exit_code=2):
    """A config key, value or combination that cannot work; names the dotted key and what is allowed."""


class UsageError(DistrainError, exit_code=2):
    """A command-line mistake (bad flag value, missing path)."""


class CheckpointError(DistrainError, exit_code=2):
    """A checkpoint that is missing, incomplete, corrupt, or does not match the run."""


class StorageError(DistrainError, exit_code=1):
    """A write the storage refused: the disk is full, a quota or file-size limit was hit, or it is read-only."""


class DataError(DistrainError, exit_code=2):
    """Data that cannot be used as it is: a token shard, an index, a dataset's samples; names the file or sample."""


class DataLoadingError(DistrainError, exit_code=1):
    """A dataset's own code failed while loading a sample (in a DataLoader worker or the training process)."""


class DistributedError(DistrainError, exit_code=1):
    """A distributed failure: a rank that did not arrive, a collective that timed out."""


class DivergenceError(DistrainError, exit_code=1):
    """Training diverged: a non-finite loss, gradient norm or weights (``train.on_nonfinite``); a runtime failure."""


class CorruptDataError(DataError, exit_code=1):
    """Data files whose bytes no longer match the checksums written with them (``distrain data verify``): damaged
    after they were written, a runtime failure of the storage rather than a mistake in the input."""


class OutOfMemoryError(DistrainError, exit_code=1):
    """A device ran out of memory in a training step (distrain.training.oom): names the rank, the step, the
    micro-batch and the memory figures, and what to try."""
