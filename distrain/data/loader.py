"""The loader is torch's DataLoader; the data position is still the global step.

``StepLoader`` drives a ``torch.utils.data.DataLoader`` with a batch sampler that yields, step after step, this
rank's micro-batch index lists from ``GlobalStepSampler`` (as ``BatchKey``s). Workers, pinned memory, prefetch
and persistent workers are the DataLoader's own. Asking for any step other than the next one (a resume, a loaded
checkpoint) restarts the sampler *at* that step: nothing is replayed or skipped, at any world size and any number
of workers, because which samples a step holds is a pure function of the step. ``EvalLoader`` is the same
DataLoader over the evaluation batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset, TensorDataset

from distrain.data.collate import CollateFn
from distrain.data.fetching import BatchKey, Fetched, FetchFailure, KeyedDataset, identity
from distrain.data.batches import move_to
from distrain.data.sampler import GlobalStepSampler
from distrain.data.workers import WorkerDeath, WorkerInit, report_worker_deaths, stop_workers, worker_ids
from distrain.env.base import available_cpus
from distrain.errors import ConfigError, DataLoadingError
from distrain.telemetry.logs import FILE_ONLY

log = logging.getLogger("distrain")

MAX_AUTO_WORKERS = 8


def in_memory(dataset: Any) -> bool:
    """Whether the data is already in memory as tensors: a built-in in-memory set, torch's TensorDataset, a tensor,
    or a Subset / ConcatDataset of those."""
    if getattr(dataset, "in_memory", False) or isinstance(dataset, (TensorDataset, torch.Tensor)):
        return True
    if isinstance(dataset, Subset):
        return in_memory(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return all(in_memory(part) for part in dataset.datasets)
    return False


def auto_num_workers(dataset: Dataset, local_world_size: int, cpus: Optional[int] = None) -> int:
    """``data.num_workers: null``: 0 for data already in memory as tensors (a batch is one gather; a worker would
    only add a copy and a process), else the CPUs left per rank after its own training process, at most 8."""
    if in_memory(dataset):
        return 0
    per_rank = (cpus or available_cpus()) // max(1, local_world_size)
    return max(0, min(MAX_AUTO_WORKERS, per_rank - 1))


@dataclass(frozen=True)
class LoaderOptions:
    """The DataLoader settings of one run (resolved from data.* and the device)."""

    num_workers: int
    pin_memory: bool
    prefetch_factor: Optional[int]  # micro-batches each worker loads ahead; None with num_workers=0
    persistent_workers: bool
    collate_fn: Optional[CollateFn] = None

    @classmethod
    def resolve(cls, data_cfg: Any, dataset: Dataset, device: torch.device, local_world_size: int, grad_accum: int,
                collate_fn: Optional[CollateFn] = None) -> "LoaderOptions":
        workers = data_cfg.num_workers
        if workers is None:
            workers = auto_num_workers(dataset, local_world_size)
        if workers < 0:
            raise ConfigError(f"data.num_workers={workers} is not allowed: it must be 0 (load in the training "
                              f"process) or a positive number of DataLoader worker processes per rank, or null "
                              f"for a number chosen from the CPU count.", key="data.num_workers")
        pin = device.type == "cuda" if data_cfg.pin_memory is None else bool(data_cfg.pin_memory)
        prefetch = data_cfg.prefetch_factor
        if workers and prefetch is None:  # enough in flight for the whole next step while this one computes
            prefetch = max(2, math.ceil(grad_accum / workers))
        return cls(num_workers=workers, pin_memory=pin and device.type == "cuda",
                   prefetch_factor=prefetch if workers else None,
                   persistent_workers=bool(data_cfg.persistent_workers) and workers > 0, collate_fn=collate_fn)

    def describe(self) -> str:
        if not self.num_workers:
            return f"data loads in the training process (num_workers=0), pin_memory={self.pin_memory}"
        return (f"data loads in {self.num_workers} DataLoader worker(s) per rank, prefetch_factor="
                f"{self.prefetch_factor}, pin_memory={self.pin_memory}, persistent_workers={self.persistent_workers}")


class StepBatchSampler(Sampler):
    """Yields this rank's micro-batches of steps [start, end) (end None: without end), as BatchKeys."""

    def __init__(self, sampler: GlobalStepSampler, rank: int, world_size: int, micro_batch: int):
        self.sampler, self.rank, self.world_size, self.micro_batch = sampler, rank, world_size, micro_batch
        self.start, self.end = 0, None  # set by StepLoader before each iteration

    def __iter__(self) -> Iterator[BatchKey]:
        step = self.start
        while self.end is None or step < self.end:
            for micro, indices in enumerate(self.sampler.micro_batches(step, self.rank, self.world_size,
                                                                       self.micro_batch)):
                yield BatchKey(step, micro, tuple(indices))
            step += 1


class _KeyedLoader:
    """A DataLoader over a KeyedDataset: yields Fetched items, turns failures into one-paragraph errors."""

    def __init__(self, dataset: Dataset, batch_sampler: Any, options: LoaderOptions, seed: int, rank: int,
                 name: str):
        self.options, self.rank, self.name = options, rank, name
        self.dataset_name = f"the {name} data ({type(dataset).__name__})"
        self.loader = DataLoader(
            KeyedDataset(dataset, seed, options.collate_fn), batch_sampler=batch_sampler,
            num_workers=options.num_workers, collate_fn=identity, pin_memory=options.pin_memory,
            prefetch_factor=options.prefetch_factor, persistent_workers=options.persistent_workers,
            generator=torch.Generator(),  # the iterator's base seed comes from here, not from the global RNG
            worker_init_fn=WorkerInit(),  # they end with this process; its stop signals are its own to handle
        )
        self._iterator: Optional[Iterator[Any]] = None
        self.step: Optional[int] = None  # the training step whose batches were asked for last (None: evaluation)

    def start(self) -> None:
        if self._iterator is not None and not self.options.persistent_workers:
            self._stop()
        self._iterator = iter(self.loader)  # persistent workers: the same workers, the sampler from its new start
        if self.options.num_workers:
            report_worker_deaths(self)  # a worker killed outright is this loader's error, wherever torch says so

    def next(self) -> Fetched:
        assert self._iterator is not None
        try:
            item = next(self._iterator)
        except StopIteration:
            raise DataLoadingError(f"rank {self.rank}: the {self.name} loader ran out of batches (a distrain bug: "
                                   f"the step sampler has no end while training continues).") from None
        except RuntimeError as err:
            if isinstance(err.__cause__, DataLoadingError):  # ours, from the SIGCHLD handler, wrapped by torch's wait
                raise err.__cause__ from None
            death = WorkerDeath.parse(err)
            if death is None:
                raise
            error = self.worker_died(death) or DataLoadingError(
                f"Loading {self.dataset_name} failed on rank {self.rank}: DataLoader worker(s) {death.how} "
                f"(pid(s) {', '.join(map(str, death.pids))}). {self._death_hint()}")
            log.error(str(error), exc_info=err, extra=FILE_ONLY)
            self._iterator = None  # torch has shut the workers down
            raise error from None
        if isinstance(item, FetchFailure):
            log.error(f"rank {self.rank}: loading {self.name} data failed:\n{item.details}", extra=FILE_ONLY)
            raise item.error(self.dataset_name, self.rank)
        return item

    def worker_died(self, death: WorkerDeath) -> Optional[DataLoadingError]:
        """One paragraph for the death of one of this loader's workers (None: not one of them): which worker, which
        step, and what to try."""
        ids = worker_ids(self._iterator)
        pid = next((p for p in death.pids if p in ids), None)
        if pid is None:
            return None
        when = "during an evaluation" if self.step is None else f"in training step {self.step + 1} (counting from 1)"
        return DataLoadingError(
            f"DataLoader worker {ids[pid]} (pid {pid}) loading {self.dataset_name} on rank {self.rank} "
            f"{death.how} {when}. {self._death_hint()}")

    def _death_hint(self) -> str:
        return (f"A worker that dies without a Python error was most often killed by the kernel's out-of-memory "
                f"killer (see `dmesg`), else crashed in native code. If it was memory, lower data.num_workers (now "
                f"{self.options.num_workers}) or data.prefetch_factor (now {self.options.prefetch_factor}), or give "
                f"the job more host memory; then start the run again (train.resume=auto continues from its latest "
                f"checkpoint). The traceback is in this rank's log.")

    def finish(self) -> None:
        """A pass is over: without persistent workers, let them go now rather than at the next pass."""
        if not self.options.persistent_workers:
            self._stop()

    def _stop(self) -> None:
        iterator, self._iterator = self._iterator, None
        stop_workers(iterator)

    def close(self) -> None:
        """Stop the workers (also persistent ones)."""
        self._stop()
        if getattr(self.loader, "_iterator", None) is not None:
            stop_workers(self.loader._iterator)
            self.loader._iterator = None


class StepLoader:
    """This rank's collated micro-batches of any global step, on the device, from a torch DataLoader."""

    def __init__(self, dataset: Dataset, sampler: GlobalStepSampler, rank: int, world_size: int, micro_batch: int,
                 end_step: int, options: LoaderOptions, device: torch.device, seed: int):
        self.device, self.end_step = device, end_step
        self.grad_accum = sampler.global_batch // world_size // micro_batch
        self.batches = StepBatchSampler(sampler, rank, world_size, micro_batch)
        self.keyed = _KeyedLoader(dataset, self.batches, options, seed, rank, "training")
        self._next_step: Optional[int] = None

    def micro_batches(self, step: int) -> List[Any]:
        """Step ``step``'s micro-batches for this rank, collated and moved to the device (non-blocking copies from
        pinned memory when pin_memory is on). The DataLoader keeps loading the next steps meanwhile."""
        if step != self._next_step:
            self._restart(step)
        self.keyed.step = step  # named if a worker dies while this step trains
        out = []
        for micro in range(self.grad_accum):
            fetched = self.keyed.next()
            if (fetched.key.step, fetched.key.micro) != (step, micro):  # the sampler's order is the contract
                raise DataLoadingError(f"the training loader delivered micro-batch {fetched.key.micro} of step "
                                       f"{fetched.key.step} where micro-batch {micro} of step {step} was due "
                                       f"(a distrain bug; please report it).")
            out.append(move_to(fetched.batch, self.device))
        self._next_step = step + 1
        return out

    def use_micro_batch(self, micro_batch: int) -> None:
        """Cut every step into micro-batches of ``micro_batch`` from now on (train.micro_batch=auto after an
        out-of-memory error): the next ``micro_batches`` starts the DataLoader again at the step it asks for, so a
        step is fetched again, the same samples cut smaller."""
        self.grad_accum = self.batches.sampler.global_batch // self.batches.world_size // micro_batch
        self.batches.micro_batch = micro_batch
        self._next_step = None

    def _restart(self, step: int) -> None:
        """Start (again) at ``step``: steps past the configured end (a benchmark, an extended run) have no end."""
        self.batches.start = step
        self.batches.end = self.end_step if step < self.end_step else None
        self.keyed.start()
        self._next_step = step

    def close(self) -> None:
        self.keyed.close()
        self._next_step = None


class EvalLoader:
    """The evaluation batches (fixed, padded so every rank runs as many) through the same kind of DataLoader."""

    def __init__(self, dataset: Dataset, batches: Sequence[BatchKey], options: LoaderOptions, device: torch.device,
                 seed: int, rank: int):
        self.device = device
        self.keys = list(batches)
        self.keyed = _KeyedLoader(dataset, self.keys, options, seed, rank, "evaluation")

    def __iter__(self) -> Iterator[Fetched]:
        self.keyed.start()
        for _ in self.keys:
            fetched = self.keyed.next()
            yield Fetched(fetched.key, move_to(fetched.batch, self.device))
        self.keyed.finish()

    def close(self) -> None:
        self.keyed.close()
