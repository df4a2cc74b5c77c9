"""Errors a user can act on. The CLI turns each into one paragraph and an exit code."""

from __future__ import annotations

from typing import Optional


class DistrainError(Exception):
    """Base of every error distrain raises on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


class ConfigError(DistrainError):
    """A config key, value or combination that cannot work; names the dotted key and what is allowed."""

    exit_code = 2


class UsageError(DistrainError):
    """A command-line mistake (bad flag value, missing path)."""

    exit_code = 2


class CheckpointError(DistrainError):
    """A checkpoint that is missing, incomplete, corrupt, or does not match the run."""

    exit_code = 2


class StorageError(DistrainError):
    """A write the storage refused: the disk is full, a quota or file-size limit was hit, or it is read-only."""

    exit_code = 1


class DataError(DistrainError):
    """Data that cannot be used as it is: a token shard, an index, a dataset's samples; names the file or sample."""

    exit_code = 2


class DataLoadingError(DistrainError):
    """A dataset's own code failed while loading a sample (in a DataLoader worker or the training process)."""

    exit_code = 1


class DistributedError(DistrainError):
    """A distributed failure: a rank that did not arrive, a collective that timed out."""

    exit_code = 1


class DivergenceError(DistrainError):
    """Training diverged: a non-finite loss, gradient norm or weights (``train.on_nonfinite``); a runtime failure."""

    exit_code = 1
