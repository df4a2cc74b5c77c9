"""Measurement hooks on a built Trainer, for the suites that look inside a step (not used by training itself).

They act on one Trainer instance (an attribute set on its strategy object, removed afterwards), so the loop
that runs is still ``Trainer.train_step``: only the decision "sync gradients now?" or "report memory now" is
taken over for the measurement.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from distrain.training.trainer import Trainer


def step_without_grad_sync(trainer: Trainer) -> Callable[[int], None]:
    """``train_step`` with gradient synchronisation suppressed on every micro-step (compute-only reference).

    The difference to the normal step is the communication the step exposes (what backward could not hide).
    """
    strategy = trainer.strategy
    accumulate = type(strategy).accumulate

    def step(s: int) -> None:
        strategy.accumulate = lambda last_micro_step: accumulate(strategy, False)
        try:
            trainer.train_step(s)
        finally:
            del strategy.accumulate

    return step


def memory_before_update(trainer: Trainer, steps: int = 2, first_step: int = 0) -> Dict[str, int]:
    """Run ``steps`` train steps and return the strategy's memory report taken just before the last update.

    At that point parameters, gradients (after backward) and optimizer state (from the earlier updates) all
    exist, which is where the ZeRO formulas count them.
    """
    strategy = trainer.strategy
    update = type(strategy).step
    reports: List[Dict[str, int]] = []

    def step_and_report() -> None:
        reports.append(strategy.memory_report())
        update(strategy)

    strategy.step = step_and_report
    try:
        for s in range(first_step, first_step + steps):
            trainer.train_step(s)
    finally:
        del strategy.step
    return reports[-1]
