"""Performance of the training step: compute vs exposed communication, peak memory, achieved FLOP/s and MFU.

How the step time is split (measured on log steps only, where the device is synchronised after each phase):

* With gradient accumulation (grad_accum >= 2), every micro-step does the same forward/backward work, but only
  the last one synchronises gradients (DDP's all-reduce, FSDP's reduce-scatter; the earlier ones run under
  ``no_sync``). The extra time of the last micro-step over the mean of the others is the communication that
  compute did not hide: the *exposed* communication. Collectives that run on every micro-step (FSDP's
  parameter all-gathers) count as compute here, and so does communication inside the optimizer step (ZeRO-1's
  parameter broadcast, DeepSpeed's engine step).
* ``strategy.sync`` (parameter averaging of local SGD / DiLoCo) is communication and counts as such.
* At world size 1 there is nothing to communicate: all of the step is compute.
* Waiting for the step's micro-batches is neither: it is ``data_s`` (near zero when DataLoader workers load the
  next step while this one computes; the whole fetch with data.num_workers=0).
* With one micro-step per step on several ranks there is no sync-free micro-step to compare with, so the
  split is reported as null (lower train.micro_batch to get accumulation and the split).
* With straggler tracking (distrain.telemetry.stragglers) a measured step on several ranks waits for every rank's
  data in a timed all-reduce right after the data phase: the time a rank waits there for a slower rank's
  micro-batches is neither its data nor its compute.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Any, ContextManager, Dict, Iterator, List, Optional

import torch

from distrain import dist
from distrain.telemetry.flops import FlopsEstimate, PeakFlops


_NOT_MEASURED = contextlib.nullcontext()


class StepTimer:
    """Wall time of the phases of one measured step: micro-steps, optimizer update, parameter sync; with
    ``time_waits`` (straggler tracking on several ranks) also the wait for the peers' data."""

    def __init__(self, device: torch.device, time_waits: bool = False):
        self.device, self.time_waits = device, time_waits
        self.measuring = False
        self.micro: List[float] = []
        self.phases: Dict[str, float] = {}

    def begin(self, measure: bool) -> None:
        """Start a step; only a measured step synchronises the device and records times."""
        self.measuring = measure
        if measure:
            self.micro, self.phases = [], {}
            self._sync_device()

    def phase(self, name: str) -> ContextManager[None]:
        """Time a phase ("micro" for a micro-step's forward+backward, or "data", "update", "sync"). With
        ``time_waits``, the data phase ends with the wait for the peers' data (``_data_then_wait``)."""
        if not self.measuring:
            return _NOT_MEASURED  # unmeasured steps pay ~nothing
        return self._data_then_wait() if name == "data" and self.time_waits else self._timed(name)

    @contextlib.contextmanager
    def _data_then_wait(self) -> Iterator[None]:
        """The data phase, then a timed all-reduce of one number, so that a rank waiting for a slower rank's
        micro-batches waits there ("wait") rather than inside its backward, where it would pass for compute."""
        with self._timed("data"):
            yield
        with self._timed("wait"):
            dist.all_reduce_sum(torch.zeros(1, device=self.device))

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._sync_device()  # CUDA kernels and NCCL run asynchronously: wait for them before reading the clock
        elapsed = time.perf_counter() - start
        if name == "micro":
            self.micro.append(elapsed)
        else:
            self.phases[name] = self.phases.get(name, 0.0) + elapsed

    def split(self, world_size: int) -> Dict[str, Optional[float]]:
        """compute_s and comm_s of the last measured step (see the module docstring for the method), and data_s:
        the time the step waited for its micro-batches (near zero when workers load ahead)."""
        if not self.micro:
            return {}
        data = self.phases.get("data")
        comm = self._comm(world_size)
        times = {"compute_s": None if comm is None else self._busy() - comm, "comm_s": comm}
        return times if data is None else {**times, "data_s": data}

    def own_times(self, world_size: int) -> List[float]:
        """(data_s, compute_s, wait_s) of the last measured step, for distrain.telemetry.stragglers: compute without
        the exposed communication where it is measurable (it holds the wait for a slower rank's backward), else
        everything but data; wait is the timed wait for the peers' data plus that exposed communication."""
        comm = self._comm(world_size) if self.micro else None
        wait = self.phases.get("wait", 0.0) + (comm or 0.0)
        return [self.phases.get("data", 0.0), self._busy() - (comm or 0.0), wait]

    def _busy(self) -> float:
        """Seconds of the micro-steps, update and sync: the step without its data and its wait for the peers' data."""
        return sum(self.micro) + sum(v for k, v in self.phases.items() if k not in ("data", "wait"))

    def _comm(self, world_size: int) -> Optional[float]:
        """The exposed communication (see the module docstring); None where it cannot be told apart."""
        if world_size == 1:
            return 0.0
        if len(self.micro) >= 2:
            baseline = sum(self.micro[:-1]) / (len(self.micro) - 1)
            return max(0.0, self.micro[-1] - baseline) + self.phases.get("sync", 0.0)
        return None

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: allocated CUDA memory on a GPU, the peak resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # Linux reports KiB, macOS bytes


def describe_holdings(rank: int, report: Dict[str, int], strategy: str) -> str:
    """One log line of what a rank holds (``Strategy.memory_report``: parameters, gradients, optimizer state)."""
    held = ", ".join(f"{kind} {size / 2**20:.2f} MiB" for kind, size in report.items())
    return f"rank {rank} holds {held} ({strategy})"


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (getrusage)"


class Throughput:
    """Achieved FLOP/s per device and MFU from samples/s, the model's FLOPs per sample and the device peak."""

    def __init__(self, flops: FlopsEstimate, peak: PeakFlops, world_size: int):
        self.flops, self.peak, self.world_size = flops, peak, world_size

    def record(self, samples_per_s: float) -> Dict[str, Any]:
        if self.flops.per_sample is None:
            return {}
        achieved = self.flops.per_sample * samples_per_s / self.world_size
        out: Dict[str, Any] = {"flops_per_s": achieved}
        out["mfu"] = achieved / self.peak.value if self.peak.value else None
        return out

    def describe(self) -> Dict[str, Any]:
        """What run.json records about the estimate, including why MFU is missing when it is."""
        return {"flops_per_sample": self.flops.per_sample, "flops_method": self.flops.method,
                "peak_flops": self.peak.value, "peak_flops_source": self.peak.source}
