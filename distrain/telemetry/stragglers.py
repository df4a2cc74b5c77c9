"""Which rank holds the others back: every rank's own data and compute time on log steps, and a warning for a rank
that lags the median rank for several log steps in a row (``metrics.straggler_factor``, ``straggler_window``).

With DDP every rank leaves the gradient all-reduce together, so step times are all the slowest rank's and a
straggler is invisible in them. What differs is how a rank spends the step: its own work (fetching its
micro-batches, computing) or waiting for its peers inside a collective. So each rank reports, from the log step
its StepTimer measured (distrain.telemetry.perf):

* ``data_s``: waiting for its micro-batches (a slow disk, a slow dataset, too few DataLoader workers);
* ``wait_s``: waiting for the slowest rank's micro-batches (a timed all-reduce right after the data phase, on log
  steps only) plus the exposed communication of the step, which holds the wait for a slower rank's backward;
* ``compute_s``: the rest of its forward, backward and update. With one micro-step per step on several ranks the
  gradient sync cannot be told apart from the backward (perf.py), so there it includes the wait for a rank that
  computes slower: a data straggler is still found, a compute straggler needs gradient accumulation
  (train.micro_batch below the per-rank batch) to be told apart. Under fsdp every micro-step's parameter
  all-gathers wait for the slowest rank too, so there a compute straggler lifts every rank's compute alike.

A rank's step time (``step_s_ranks``) is data + compute: what it would take alone. It is compared with the median
rank's (the lower middle value: at 2 ranks the slower one is compared with the faster one, where the mean of the
two would hide half the lag). The numbers ride the log step's one small all-reduce that gathers peak memory
(distrain.telemetry.step_record), so every rank sees the same table and reaches the same verdict.
"""

from __future__ import annotations

import socket
import statistics
from typing import Any, Dict, List, Optional, Sequence

from distrain import dist
from distrain.telemetry.logs import get_logger

PHASES = ("data_s", "compute_s", "wait_s")  # the per-rank numbers a log step gathers, in this order


def _lags(times: Sequence[float]) -> List[float]:
    """Each rank's time over the median rank's (statistics.median_low); 1.0 where the median took no time."""
    median = statistics.median_low(times)
    return [t / median if median > 0 else 1.0 for t in times]


class StragglerTracker:
    """Reads every rank's phase times of a log step into the record (``fields``) and warns once per rank that is
    ``factor`` x slower than the median rank for ``window`` log steps in a row. Off (no fields, no wait timed)
    with ``factor`` 0 or a single rank."""

    def __init__(self, factor: float, window: int, world_size: int):
        self.factor, self.window = factor, window
        self.enabled = factor > 0 and world_size > 1
        self.streaks = [0] * world_size  # log steps in a row each rank has lagged
        self.warned: set = set()  # ranks warned about (once each)
        self._hosts: Optional[List[str]] = None  # gathered the first time a warning names one

    @classmethod
    def from_config(cls, metrics: Any, world_size: int) -> "StragglerTracker":
        """The tracker of ``metrics.straggler_factor`` and ``metrics.straggler_window``."""
        return cls(float(metrics.straggler_factor), int(metrics.straggler_window), world_size)

    def fields(self, step: int, rows: Sequence[Sequence[float]]) -> Dict[str, Any]:
        """The record's per-rank fields from ``rows[rank] = (data_s, compute_s, wait_s)``; warns about a rank whose
        lag has lasted ``window`` log steps. Collective when it warns (the host names are gathered then): every
        rank calls it with the same rows."""
        # microseconds are plenty: the lists stay short in metrics.jsonl
        data, compute, wait = ([round(float(row[i]), 6) for row in rows] for i in range(len(PHASES)))
        own = [round(d + c, 6) for d, c in zip(data, compute)]
        lags = _lags(own)
        slowest = max(range(len(own)), key=own.__getitem__)
        record: Dict[str, Any] = {
            "step_s_ranks": own, "data_s_ranks": data, "compute_s_ranks": compute, "wait_s_ranks": wait,
            "slowest_rank": slowest, "slowest_rank_lag": round(lags[slowest], 4),
            "slowest_phase": slow_phase(slowest, data, compute)}
        self.streaks = [s + 1 if lag >= self.factor else 0 for s, lag in zip(self.streaks, lags)]
        due = [r for r, s in enumerate(self.streaks) if s >= self.window and r not in self.warned]
        if due:
            self._warn(step, due, lags, data, compute)
        return record

    def _warn(self, step: int, ranks: List[int], lags: List[float], data: List[float], compute: List[float]) -> None:
        if self._hosts is None:  # once, and only when there is something to say: no collective otherwise
            hosts = [str(h) for h in dist.all_gather_object(socket.gethostname())]
            # without a process group (one process reading rows, as the unit tests do) its host stands for all
            self._hosts = hosts if len(hosts) == len(self.streaks) else hosts[:1] * len(self.streaks)
        for rank in ranks:
            self.warned.add(rank)
            phase = slow_phase(rank, data, compute)
            times = data if phase == "data" else compute
            get_logger().warning(
                f"straggler: rank {rank} on host {self._hosts[rank]} has been at least {self.factor:g}x slower "
                f"than the median rank for {self.window} log steps in a row (step {step}: {lags[rank]:.2f}x); "
                f"its slow phase is {phase}: {1e3 * times[rank]:.1f} ms against the median rank's "
                f"{1e3 * statistics.median_low(times):.1f} ms, and every other rank waits for it in every step. "
                f"metrics.jsonl has every rank's times (step_s_ranks, {phase}_s_ranks); this warning comes once "
                f"per rank (metrics.straggler_factor, metrics.straggler_window).")


def slow_phase(rank: int, data: Sequence[float], compute: Sequence[float]) -> str:
    """'data' or 'compute': the phase in which ``rank`` exceeds the median rank by more seconds."""
    over_data = data[rank] - statistics.median_low(data)
    over_compute = compute[rank] - statistics.median_low(compute)
    return "data" if over_data >= over_compute else "compute"


__all__ = ["PHASES", "StragglerTracker", "slow_phase"]
