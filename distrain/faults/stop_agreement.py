"""The agreement that makes every rank stop after the same step: lagged, and every quarter second of training.

Every rank's stop request (``PreemptionHandler.local_code``) goes into one tiny all-reduce (MAX), so all ranks see
the same answer after the same step - even when only some of them were signalled - and stop there together. Its
cost is kept off the loop (a synchronous all-reduce after every step cost 1.4% of the gpt step on 2 gloo ranks;
BENCHMARKS.md, "distrain's own per-step cost") in two ways:

- spaced: on short steps the next agreement comes ``every`` steps later, about ``AGREE_EVERY_S`` of training. Each
  rank proposes its own spacing from its step time, inside the all-reduce (as a negative number: MAX keeps the
  smallest spacing), so every rank reads the same spacing and the agreements fall after the same steps;
- lagged: on short steps an agreement is started (``async_op``) after one step and read at the next agreement, so
  it travels while training goes on, and the read finds it done instead of waiting for a round trip to every rank.

Where a step takes ``AGREE_EVERY_S`` or more on some rank (the agreed spacing is one step), the round trip is
nothing beside a step: the agreement is read as soon as it is started, and a signal is acted on after the step in
which it arrives, as a long step's preemption deadline needs. On short steps a signal is acted on at the latest two
agreements after it arrives: about 2 x ``AGREE_EVERY_S`` of training.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Tuple

import torch
import torch.distributed as torch_dist

from distrain.faults.preemption import NO_STOP

# Training time between two agreements: what a stop may lag a signal by, at most twice. Senders leave much more
# (SLURM's --signal=USR1@120 seconds, torchrun's and Kubernetes' 30 s before SIGKILL) for the checkpoint.
AGREE_EVERY_S = 0.25
MAX_EVERY = 1000  # steps; a bound on the spacing however short a step is


class StopAgreement:
    """One rank's side of the lagged, spaced stop agreement; ``collect`` after every step, on every rank."""

    def __init__(self, group: Any = None):
        self.group = group
        # The agreement in flight: its work and the tensor it reduces (kept here until the work is done, so the
        # tensor is never freed from gloo's worker thread, which would need the GIL: see dist.leave_process_group).
        self._pending: Optional[Tuple[Any, torch.Tensor]] = None
        self._due = 0  # the completed step of the next read or start: the same on every rank
        self._every = 1  # the agreed spacing in steps (1 until the ranks have timed their steps)
        self._started: Optional[Tuple[int, float]] = None  # (completed step, perf_counter) of the last start

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def collect(self, completed: int, request: int, start_next: bool = True) -> int:
        """Collective, after every step on every rank: the strongest request any rank made when the agreement
        due now started (NO_STOP when none is due), then the next one with ``request``, unless there is a stop to
        act on or ``start_next`` is False (no step left: the one in flight is read now, whatever is due). With
        long steps (an agreed spacing of one step) the new agreement is read at once."""
        if start_next and completed < self._due:
            return NO_STOP  # between two agreements: nothing to read, nothing to start
        agreed = self._read() if self._pending is not None else NO_STOP
        if agreed == NO_STOP and start_next:
            # on the CPU: the group is gloo (see FaultTolerance)
            flag = torch.tensor([request, -self._spacing(completed)], dtype=torch.int64)
            work = torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.group, async_op=True)
            self._pending = (work, flag)
            if self._every == 1:  # the same on every rank: the spacing came out of the last all-reduce
                agreed = self._read()
            self._due = completed + self._every
        return agreed

    def _read(self) -> int:
        """The pending agreement's answer (its spacing kept for the next one); waits for it if it is not done."""
        work, flag = self._pending
        work.wait()  # started about AGREE_EVERY_S ago: done, unless a rank is that far behind
        agreed, every = (int(value) for value in flag.tolist())
        self._every, self._pending = -every, None
        return agreed

    def _spacing(self, completed: int) -> int:
        """This rank's proposal: how many of its recent steps make AGREE_EVERY_S (1 before it has timed any)."""
        now, started = time.perf_counter(), self._started
        self._started = (completed, now)
        if started is None or completed <= started[0]:
            return 1
        step_s = (now - started[1]) / (completed - started[0])
        return max(1, min(MAX_EVERY, int(AGREE_EVERY_S / max(step_s, 1e-9))))

    def drop_finished(self) -> None:
        """Before the group goes (``FaultTolerance.close``): forget an agreement in flight once it is done. One that
        is not (a peer failed before starting it) stays referenced: the group's teardown waits for gloo's worker
        threads, and only then may its tensor be freed."""
        if self._pending is not None and self._pending[0].is_completed():
            self._pending[0].wait()
            self._pending = None
