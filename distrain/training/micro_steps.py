"""A step's forward and backward passes, one micro-batch at a time, and the redo of a step that ran out of memory.

Each micro-batch's loss is its share of the global-batch mean (distrain.training.objective). With a fixed
train.micro_batch an out-of-memory error ends the run in one paragraph (distrain.training.oom). With
train.micro_batch=auto it ends only the attempt: the global batch and each step's samples do not depend on the
micro-batch, so the step is redone from its first micro-batch at the next smaller divisor of the per-rank share,
with the same samples, the same random state and nothing else changed. docs/out-of-memory.md has the protocol:

1. a rank that runs out of memory stops its micro-steps; the earlier ones synchronise nothing (no_sync), so
   no peer waits for it there;
2. it issues the collectives its peers still run in the step (``Strategy.rejoin_after_oom``: DDP's gradient
   all-reduces of the last backward, strategies/ddp_join.py; FSDP's all-gathers and reduce-scatters of every
   micro-step left, by replaying them on one sample, strategies/fsdp_oom.py);
3. after the last backward every rank knows whether any rank failed (under DDP's plain comm hook a number
   summed inside the last gradient bucket's all-reduce, no collective of its own; otherwise one small
   all-reduce per step: the only cost once the size is settled); on a failure their rows (where, memory) are
   all-reduced, and every rank drops the step's gradients, releases memory, restores the random
   state and redoes the step smaller, or, at micro-batch 1 or where the strategy could not join, every rank ends
   in the same paragraph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

from distrain import dist
from distrain.config import BatchPlan
from distrain.config.validation import auto_plan, smaller_plan
from distrain.data import StepLoader
from distrain.errors import ConfigError, OutOfMemoryError
from distrain.strategies.base import Strategy
from distrain.strategies.fsdp_oom import first_sample
from distrain.telemetry.logs import FILE_ONLY
from distrain.telemetry.profiling import label
from distrain.training.objective import Objective
from distrain.training.oom import FATAL, OK, PHASES, RETRY, Failure, MemoryFigures, Snapshots, is_oom, \
    oom_paragraph, release_memory


@dataclass
class Attempt:
    """One try at a step: its loss share (None after a failure) and, on this rank, where it ran out of memory."""

    loss: Optional[torch.Tensor]
    failure: Optional[Failure]
    joined: bool = True  # whether this rank could join its peers' gradient collectives after the failure


class MicroSteps:
    """Forward and backward of every micro-batch of a step; under micro_batch=auto, redone smaller on OOM."""

    def __init__(self, strategy: Strategy, objective: Objective, loader: StepLoader, timer: Any,
                 log: logging.Logger, snapshots: Optional[Path] = None):
        """``loader``: this rank's micro-batches of a step (fetched again, cut anew, for a redone step);
        ``snapshots``: where metrics.memory_snapshot writes."""
        self.plan: BatchPlan = strategy.ctx.plan  # where the search stands (the trainer's plan until an OOM)
        if self.plan.auto and not strategy.supports_auto_micro_batch:
            raise ConfigError(f"train.micro_batch=auto is not supported by strategy.name={strategy.name!r}: "
                              f"{strategy.auto_micro_batch_refusal} (docs/out-of-memory.md). Set a fixed "
                              f"train.micro_batch, or use ddp, zero1, fsdp, accelerate or local_sgd.",
                              key="train.micro_batch")
        self.strategy, self.objective, self.loader, self.timer, self.log = strategy, objective, loader, timer, log
        self.info, self.device = strategy.ctx.info, strategy.ctx.device
        self._phase = PHASES[0]
        self.snapshots = Snapshots(snapshots, self.device, log)

    def run(self, step: int, batches: List[Any]) -> torch.Tensor:
        """This rank's share of step ``step``'s objective, its gradients accumulated (and synchronised)."""
        if not self.plan.auto:
            attempt = self._attempt(step, batches)
            if attempt.failure is not None:  # no retry: this rank's paragraph; the peers learn it from the watchdog
                raise OutOfMemoryError(self._paragraph([attempt.failure], step, "The micro-batch is fixed."))
            return attempt.loss
        rng = _rng_state(self.device)
        while True:
            attempt = self._attempt(step, batches)
            failures, fatal = self._agree(step, attempt)
            if not failures:
                return attempt.loss
            batches = []  # the attempt's inputs go before the retry's arrive
            self._drop(step, failures, fatal)
            _set_rng_state(self.device, rng)  # dropout draws what it drew before the failed attempt
            batches = self.loader.micro_batches(step)

    def _attempt(self, step: int, batches: List[Any]) -> Attempt:
        channel = self.strategy.outcome_channel() if self.plan.auto else None
        if channel is not None:
            channel.arm()
        counts, total = self.objective.step_counts(batches, step)  # an empty micro-batch under a mean: noted
        loss: Optional[torch.Tensor] = None
        last = len(batches) - 1
        for i, (batch, items) in enumerate(zip(batches, counts)):
            try:
                share = self._micro_step(batch, items, total, i == last)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err):
                    raise
                self.log.error(f"rank {self.info.rank}: out of memory at step {step}, micro-step {i} "
                               f"(micro_batch={self.plan.micro_batch}, {self._phase})", exc_info=True, extra=FILE_ONLY)
                failure = Failure(self.info.rank, i, self._phase, MemoryFigures.of(self.device))
                self.snapshots.write(self.info.rank, step)
                break  # the error and its traceback (the activations) are released here
            loss = share if loss is None else loss + share
        else:
            return Attempt(loss, None)
        # the last micro-step's gradient collectives: the peers are in them (or will be); join them, the outcome
        # riding inside them where the strategy carries it
        if channel is not None:
            channel.fail()
        replay = self._replay(batches[failure.micro], counts[failure.micro], total)
        joined = self.plan.auto and self.strategy.rejoin_after_oom(failure.micro, len(batches), failure.phase, replay)
        return Attempt(None, failure, joined)

    def _replay(self, batch: Any, items: Any, total: Any) -> Callable[[], torch.Tensor]:
        """The loss of the failed micro-batch's first sample: what a strategy whose collectives ride the model's
        own forward and backward (FSDP) runs to issue the ones its peers still expect (its value is thrown away)."""
        def replay() -> torch.Tensor:
            with self.strategy.forward_context():
                return self.objective.micro_loss(self.strategy.model, first_sample(batch), items, total).loss
        return replay

    def _micro_step(self, batch: Any, items: Any, total: Any, last: bool) -> torch.Tensor:
        self._phase = PHASES[0]
        with self.timer.phase("micro"), self.strategy.accumulate(last_micro_step=last):
            with self.strategy.forward_context(), label("forward"):
                micro = self.objective.micro_loss(self.strategy.model, batch, items, total)
            self._phase = PHASES[1]
            with label("backward"):  # gradient sync rides the last backward (grad-sync: DDP's bucket hooks)
                self.strategy.backward(micro.loss, micro.scale)
        return micro.share

    def _agree(self, step: int, attempt: Attempt) -> Tuple[List[Failure], bool]:
        """Every rank's outcome of the attempt: the failures, and whether any of them cannot be retried. Whether
        any rank failed rode inside the last gradient bucket (DDP's plain hook): nothing more to do when none did;
        otherwise (or without that channel) one all-reduce of every rank's row of a few numbers."""
        mine = attempt.failure
        channel = self.strategy.outcome_channel()
        if channel is not None and channel.carried:
            if mine is not None and not attempt.joined:  # its 0 already left with the last bucket: end here
                raise OutOfMemoryError(self._paragraph([mine], step, _TOO_LATE))
            if not channel.any_failed():
                return [], False
        row = _row(mine, FATAL if mine is not None and not attempt.joined else RETRY)
        rows = dist.per_rank_vector(torch.tensor(row, dtype=torch.float64, device=self.device))
        failures = [Failure(rank, int(r[1]), PHASES[int(r[2])], MemoryFigures(*r[3:7]))
                    for rank, r in enumerate(rows) if r[0] != OK]
        return failures, any(r[0] == FATAL for r in rows)

    def _drop(self, step: int, failures: List[Failure], fatal: bool) -> None:
        """Drop the failed attempt on every rank and move to the next smaller micro-batch, or end in one paragraph."""
        self.strategy.drop_step()
        release_memory(self.device)
        smaller = None if fatal else smaller_plan(self.plan)
        if smaller is None:
            why = _TOO_LATE if fatal else "train.micro_batch=auto has no smaller micro-batch to try."
            raise OutOfMemoryError(self._paragraph(failures, step, why))
        self.log.warning(f"out of memory at step {step} with micro_batch={self.plan.micro_batch} on rank(s) "
                         f"{', '.join(str(f.rank) for f in failures)}: redoing the step at micro_batch="
                         f"{smaller.micro_batch} (x {smaller.grad_accum} micro-steps)")
        self._switch(smaller)

    def _switch(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.strategy.use_plan(plan)
        self.loader.use_micro_batch(plan.micro_batch)

    def resume(self, micro_batch: Optional[int], world_size: int) -> None:
        """A resumed micro_batch=auto run starts at the size its checkpoint trained at, if saved at this world size
        (the per-rank share is the same); at another world size the search starts again."""
        if not self.plan.auto or micro_batch is None:
            return
        if world_size != self.plan.world_size:
            self.log.info(f"resume: train.micro_batch=auto searches again (the checkpoint trained at micro_batch="
                          f"{micro_batch} at world size {world_size}; now {self.plan.world_size})")
            return
        if micro_batch < self.plan.micro_batch:
            self._switch(auto_plan(self.plan.global_batch, self.plan.world_size, micro_batch))
        self.log.info(f"resume: train.micro_batch=auto starts at micro_batch={self.plan.micro_batch}, the size the "
                      f"checkpoint trained at")

    def _paragraph(self, failures: List[Failure], step: int, why: str) -> str:
        snapshot = self.snapshots.path(failures[0].rank, step)
        return oom_paragraph(failures, step, self.plan.micro_batch, self.device.type, self.strategy.name,
                             self.plan.auto, why, str(snapshot) if snapshot else None)


_TOO_LATE = "It struck after the last gradient was reduced, where the step cannot be redone."


def _row(failure: Optional[Failure], code: int = RETRY) -> List[float]:
    """This rank's 7 numbers in the outcome all-reduce: OK, or ``code`` and where it failed."""
    if failure is None:
        return [float(OK), 0.0, 0.0, *MemoryFigures().as_list()]
    return [float(code), float(failure.micro), float(PHASES.index(failure.phase)), *failure.memory.as_list()]


def _rng_state(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The random state a step starts from (CPU, and the step's CUDA device): dropout of a redone step."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
