"""What a DataLoader worker (or the training process) does with one micro-batch: fetch, seed, collate, report.

The loader's batch sampler yields a ``BatchKey`` (global step, micro-batch number, dataset indices) instead of a
bare index list; ``KeyedDataset.__getitems__`` fetches those samples under their fetch context (see
``distrain.data.seeding``), collates them, and returns ``Fetched(key, batch)``. A sample whose loading raises comes
back as a ``FetchFailure`` value instead of an exception, so the training process can name the sample, the step
and the error in one paragraph (torch would re-raise a bare copy of the exception with a worker traceback).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Tuple

from torch.utils.data import Dataset, Subset, get_worker_info

from distrain.data.collate import CollateFn, check_same_keys, collate
from distrain.data.seeding import EVAL_STEP, fetching, preserved_global_rng
from distrain.errors import DataError, DataLoadingError, DistrainError


@dataclass(frozen=True)
class BatchKey:
    step: int  # global step (EVAL_STEP for evaluation)
    micro: int  # this micro-batch's place in the rank's step (evaluation: the batch number)
    indices: Tuple[int, ...]  # dataset indices, in order
    padding: bool = False  # evaluation only: a batch every rank runs but whose outputs are not counted


class Fetched(NamedTuple):  # a NamedTuple: DataLoader's pin_memory pins the batch inside and passes the key
    key: BatchKey
    batch: Any


@dataclass(frozen=True)
class FetchFailure:
    """A micro-batch that could not be loaded, as plain picklable data (it crosses the worker's result queue)."""

    key: BatchKey
    index: Optional[int]  # the sample that failed, when known
    error_type: str
    message: str
    details: str  # the dataset's traceback, for the rank's log
    worker: Optional[int]  # DataLoader worker id; None: the training process
    data_error: bool  # True: distrain's own check of the data (a DataError, exit 2); False: the dataset's code

    def describe(self, dataset_name: str, rank: int) -> str:
        where = "the training process" if self.worker is None else f"DataLoader worker {self.worker}"
        what = (f"sample {self.index}" if self.index is not None else
                f"micro-batch {self.key.micro} ({len(self.key.indices)} samples, from {self.key.indices[0]})")
        when = "evaluation" if self.key.step == EVAL_STEP else f"step {self.key.step}"
        if self.data_error:
            return f"{self.message} (rank {rank}, {what} of {dataset_name}, {when}, in {where})"
        return (f"Loading {what} of {dataset_name} for {when} failed on rank {rank} in {where}: {self.error_type}: "
                f"{self.message}. The dataset's traceback is in this rank's log; fix the dataset (or the sample), "
                f"then resume: the run continues at the step it stopped at.")

    def error(self, dataset_name: str, rank: int) -> DistrainError:
        message = self.describe(dataset_name, rank)
        return DataError(message) if self.data_error else DataLoadingError(message)


def identity(batch: Any) -> Any:
    """The DataLoader's collate_fn: KeyedDataset has collated already (module level, so workers can unpickle it)."""
    return batch


def batched_fetch(dataset: Any) -> bool:
    """Whether to fetch a micro-batch with one ``__getitems__`` call (the dataset's fast path) rather than sample by
    sample. torch's Subset (what random_split returns) forwards ``__getitems__`` to a dataset that may only have
    ``__getitem__``: then per sample, so that each sample is fetched under its own context (sample_rng())."""
    if not callable(getattr(dataset, "__getitems__", None)):
        return False
    if isinstance(dataset, Subset):
        return batched_fetch(dataset.dataset)
    return True


class KeyedDataset(Dataset):
    """The user's dataset as the DataLoader sees it: keyed micro-batches in, ``Fetched`` / ``FetchFailure`` out."""

    def __init__(self, dataset: Dataset, seed: int, collate_fn: Optional[CollateFn] = None):
        self.dataset = dataset
        self.seed = seed
        self.collate_fn = collate_fn
        self._batched = batched_fetch(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: BatchKey) -> Any:  # the DataLoader calls __getitems__; this is the same for one key
        return self.__getitems__(key)

    def __getitems__(self, key: BatchKey) -> Any:  # type: ignore[override]
        if not self._batched and get_worker_info() is None:
            # per-sample fetches reseed the global RNGs; in the training process they are put back afterwards, so
            # dropout and the model draw the same numbers with or without workers (~0.15 ms a micro-batch)
            with preserved_global_rng():
                return self._fetch(key)
        return self._fetch(key)

    def _fetch(self, key: BatchKey) -> Any:
        current: Optional[int] = None
        try:
            if self._batched:  # the dataset's fast path: the whole micro-batch at once; sample_rng(i) per sample
                with fetching(self.seed, key.step, None):
                    fetched = self.dataset.__getitems__(list(key.indices))  # type: ignore[attr-defined]
            else:
                fetched = []
                for current in key.indices:
                    with fetching(self.seed, key.step, current):
                        fetched.append(self.dataset[current])
                current = None
            if isinstance(fetched, list):
                check_same_keys(fetched, key.indices)
            return Fetched(key, collate(fetched, self.collate_fn))
        except Exception as err:  # noqa: BLE001 - reported on the rank with the sample and the step
            info = get_worker_info()
            return FetchFailure(key=key, index=current, error_type=type(err).__name__, message=str(err),
                                details=traceback.format_exc(), worker=None if info is None else info.id,
                                data_error=isinstance(err, DataError))


__all__: List[str] = ["BatchKey", "Fetched", "FetchFailure", "KeyedDataset", "identity", "EVAL_STEP"]
