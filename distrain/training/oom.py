"""Out-of-memory errors in a training step: recognising them, the device's memory figures, the one paragraph.

torch raises ``torch.OutOfMemoryError`` for CUDA (and XPU) allocations; the MPS backend and some older paths raise a
plain ``RuntimeError`` whose message says "out of memory". Both count. The paragraph names the rank, the step, the
micro-batch, allocated / reserved / peak memory and the device's total, and what to try; the traceback goes to
the rank's log only (the CLI prints the paragraph).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

GIB = 2**30
# What the agreement all-reduce carries per rank (distrain.training.micro_steps): an outcome code, where it struck,
# and this rank's memory figures in bytes.
OK, RETRY, FATAL = 0, 1, 2
PHASES = ("forward", "backward")


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error from any accelerator torch drives (CUDA, XPU: OutOfMemoryError; MPS: RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


@dataclass
class MemoryFigures:
    """The caching allocator's view of one device, in bytes (all zero where torch keeps none: the CPU)."""

    allocated: float = 0.0
    reserved: float = 0.0
    peak: float = 0.0
    total: float = 0.0

    @classmethod
    def of(cls, device: torch.device) -> "MemoryFigures":
        if device.type != "cuda":
            return cls()
        return cls(float(torch.cuda.memory_allocated(device)), float(torch.cuda.memory_reserved(device)),
                   float(torch.cuda.max_memory_allocated(device)),
                   float(torch.cuda.get_device_properties(device).total_memory))

    def as_list(self) -> List[float]:
        return [self.allocated, self.reserved, self.peak, self.total]

    def describe(self, device: str) -> str:
        if not self.total:
            return f"{device} keeps no allocator figures"
        return (f"{self.allocated / GIB:.2f} GiB allocated, {self.reserved / GIB:.2f} GiB reserved, "
                f"{self.peak / GIB:.2f} GiB peak, of {self.total / GIB:.2f} GiB on {device}")


@dataclass
class Failure:
    """Where a rank ran out of memory in a step."""

    rank: int
    micro: int  # the micro-step's index in the step
    phase: str  # forward | backward
    memory: MemoryFigures


class Snapshots:
    """metrics.memory_snapshot: the CUDA allocator's history, recorded from the start and written on an OOM."""

    def __init__(self, directory: Optional[Path], device: torch.device, log: logging.Logger):
        self.directory = directory if directory is not None and device.type == "cuda" else None
        if directory is not None and self.directory is None:
            log.warning(f"metrics.memory_snapshot=true records the CUDA allocator's history; this run is on "
                        f"{device.type}, so no snapshot is recorded")
        if self.directory is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def path(self, rank: int, step: int) -> Optional[Path]:
        return None if self.directory is None else self.directory / f"oom_rank{rank}_step{step}.pickle"

    def write(self, rank: int, step: int) -> None:
        """This rank's allocator history now, while the failed attempt's memory is still held."""
        path = self.path(rank, step)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))


def release_memory(device: torch.device) -> None:
    """Hand cached blocks back after a failed step, so the retry (and other processes) see them free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def oom_paragraph(failures: List[Failure], step: int, micro_batch: int, device: str, strategy: str, auto: bool,
                  why: str, snapshot: Optional[str] = None) -> str:
    """The one paragraph: who ran out of memory where, its memory, and what to try."""
    where = "; ".join(f"rank {f.rank} in the {f.phase} of micro-step {f.micro} "
                      f"({f.memory.describe(device)})" for f in failures)
    tries = ["a sharding strategy (strategy.name=fsdp or zero1; `distrain plan --device-memory-gb` compares them)",
             "train.activation_checkpointing=full", "train.precision=bf16"]
    if not auto:
        tries.insert(0, "train.micro_batch=auto (the largest micro-batch that fits, same trajectory)")
    else:
        tries.insert(0, "a smaller model or sequence length")
    saved = f" The allocator's history is in {snapshot} (open it at https://pytorch.org/memory_viz)." if snapshot else ""
    return (f"Out of memory at step {step} with train.micro_batch={micro_batch} (strategy {strategy}): {where}. "
            f"{why}{saved} Try {', '.join(tries[:-1])} or {tries[-1]}. The full traceback is in the rank's log.")
