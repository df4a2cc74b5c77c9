"""The lifetime of DataLoader workers: they start with the training process's signals set aside, end with it
whatever kills it, and are stopped for good when the loader closes.

torchrun's agent and SLURM signal the whole process group, DataLoader workers included: a worker must neither run
the training process's handler (whose state is a stale copy from the fork) nor die of the signal mid-step, or the
rank's orderly stop would fail for want of its data. So workers ignore the stop signals - and therefore cannot be
ended by SIGTERM, which is how torch (a worker that does not join) and ``multiprocessing`` (its daemonic children,
at interpreter exit) end them. Instead: the kernel kills a worker when its training process dies (parent-death
signal), and ``stop_workers`` kills the ones that did not leave when asked.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

from distrain.config.schema import FAULT_SIGNALS
from distrain.env.parent_death import die_with_parent

JOIN_AFTER_KILL_S = 5.0


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
