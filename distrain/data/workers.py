"""The lifetime of DataLoader workers: they start with the training process's signals set aside, end with it
whatever kills it, and are stopped for good when the loader closes.

torchrun's agent and SLURM signal the whole process group, DataLoader workers included: a worker must neither run
the training process's handler (whose state is a stale copy from the fork) nor die of the signal mid-step, or the
rank's orderly stop would fail for want of its data. So workers ignore the stop signals - and therefore cannot be
ended by SIGTERM, which is how torch (a worker that does not join) and ``multiprocessing`` (its daemonic children,
at interpreter exit) end them. Instead: the kernel kills a worker when its training process dies (parent-death
signal), and ``stop_workers`` kills the ones that did not leave when asked.

A worker that dies without a Python error (the OOM killer's SIGKILL, a crash in native code) is noticed by torch's
SIGCHLD handler, which raises a bare RuntimeError in the training process wherever it happens to be (a forward, a
collective, a checkpoint), not where the loader waits for data. ``report_worker_deaths`` extends that handler so
the loader that owns the worker turns it into its own one-paragraph error (which worker, which step, what to try).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from distrain.config.schema import FAULT_SIGNALS
from distrain.env.parent_death import die_with_parent
from distrain.telemetry.logs import FILE_ONLY

log = logging.getLogger("distrain")

JOIN_AFTER_KILL_S = 5.0
# torch's words for a worker that died without a Python error: its SIGCHLD handler (torch/csrc/DataLoader.cpp)
# says "DataLoader worker (pid 123) is killed by signal: Killed." or "... exited unexpectedly with exit code 1";
# its iterator, when it finds the worker gone while waiting, "DataLoader worker (pid(s) 123, 456) exited unexpectedly"
_WORKER_PIDS = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_KILLED_BY = re.compile(r"is killed by signal: ([^.]+)")
_EXIT_CODE = re.compile(r"exit code (-?\d+)")
_SIGNAL_NAMES = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}


def ignore_stop_signals() -> None:
    """Ignore the stop signals whose handler came from the training process (distrain.faults)."""
    for name in FAULT_SIGNALS:  # the signals distrain.faults may handle (faults.stop_signals and friends)
        sig = getattr(signal, f"SIG{name}", None)
        if sig is not None and callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class WorkerInit:
    """The DataLoader's ``worker_init_fn``: end with the training process (SIGKILL: a worker holds nothing to
    save), then set its stop signals aside. Built in the training process, which it records as the parent."""

    parent_pid: int = field(default_factory=os.getpid)

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid, signal.SIGKILL)
        ignore_stop_signals()


def stop_workers(iterator: Any) -> None:
    """Shut down a DataLoader iterator's workers the DataLoader's way, then kill any that is still alive (one that
    ignores SIGTERM and did not join, e.g. busy in a dataset's native code), so nobody waits on it later."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:  # no workers (num_workers=0)
        return
    shutdown()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=JOIN_AFTER_KILL_S)


@dataclass(frozen=True)
class WorkerDeath:
    """DataLoader worker(s) that died without a Python error, as torch reported it."""

    pids: Tuple[int, ...]
    how: str  # "was killed by signal SIGKILL (Killed)", "exited with code 1", "exited unexpectedly"

    @classmethod
    def parse(cls, err: BaseException) -> Optional["WorkerDeath"]:
        """The death torch's RuntimeError reports, or None for any other error."""
        pids = _WORKER_PIDS.search(str(err)) if isinstance(err, RuntimeError) else None
        if pids is None:
            return None
        killed, code = _KILLED_BY.search(str(err)), _EXIT_CODE.search(str(err))
        if killed:
            text = killed.group(1).strip()
            how = f"was killed by signal {_SIGNAL_NAMES.get(text, '?')} ({text})"
        else:
            how = f"exited with code {code.group(1)}" if code else "exited unexpectedly"
        return cls(tuple(int(p) for p in pids.group(1).replace(",", " ").split()), how)


def worker_ids(iterator: Any) -> Dict[int, int]:
    """pid -> DataLoader worker id of an iterator's worker processes (none with num_workers=0)."""
    return {worker.pid: i for i, worker in enumerate(getattr(iterator, "_workers", ()))}


class DeathReporter(Protocol):
    def worker_died(self, death: WorkerDeath) -> Optional[Exception]:
        """The error to raise when ``death`` is about one of this loader's workers, else None."""


# Process-wide, like the SIGCHLD handler they extend (torch keeps its worker pids the same way): the loaders whose
# workers may die, and the handler that was there before ours (torch's).
_REPORTERS: "weakref.WeakSet[DeathReporter]" = weakref.WeakSet()
_previous_sigchld: Optional[Callable[[int, Optional[FrameType]], Any]] = None


def report_worker_deaths(reporter: DeathReporter) -> None:
    """After ``iter(loader)`` has set torch's SIGCHLD handler: a death torch reports about one of ``reporter``'s
    workers is raised as ``reporter``'s error instead, the stack where it surfaced going to the rank's log only."""
    global _previous_sigchld
    _REPORTERS.add(reporter)
    if threading.current_thread() is not threading.main_thread():  # torch sets no handler there either
        return
    current = signal.getsignal(signal.SIGCHLD)
    # Once per process, over torch's handler (set once, by the first iterator with workers); never over a handler
    # set later, which may call ours in turn.
    if _previous_sigchld is None and callable(current):
        _previous_sigchld = current
        signal.signal(signal.SIGCHLD, _on_sigchld)


def _on_sigchld(signum: int, frame: Optional[FrameType]) -> None:
    try:
        if _previous_sigchld is not None:
            _previous_sigchld(signum, frame)
    except RuntimeError as err:
        death = WorkerDeath.parse(err)
        for reporter in list(_REPORTERS) if death else ():
            error = reporter.worker_died(death)
            if error is not None:
                stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
                log.error(f"{error}\nWhere the training process was when torch reported it:\n"
                          f"Traceback (most recent call last):\n{stack}{type(err).__name__}: {err}", extra=FILE_ONLY)
                raise error from err
        raise
