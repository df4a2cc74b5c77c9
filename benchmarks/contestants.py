"""Who races whom: distrain's Trainer with a strategy, against the same thing hand-written with the raw engine.

A ``Pair`` names a distrain strategy (with kwargs) and the reference loop it is measured against. Pairs whose
strategy is not registered yet (``distrain.strategies.STRATEGIES``), or whose reference lives in a module that
does not exist yet (``benchmarks/engines.py``), are skipped with a note, and picked up once they exist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks.workload import Workload
from distrain.errors import DistrainError
from distrain.strategies import STRATEGIES, strategy_class


class DistrainContestant:
    """distrain's side: a Trainer built with ``strategy``; one step is ``Trainer.train_step`` (the loop body)."""

    def __init__(self, work: Workload, strategy: str, kwargs: Dict[str, Any]):
        from distrain.training.trainer import Trainer

        # No loss_fn: the data's built-in loss, as a user of the built-in data gets it, with its static item count
        # (a loss_fn passed in counts its labels with one small all-reduce per step; the hand-written loops don't).
        self.trainer = Trainer(work.config_for(strategy, kwargs), train_data=work.train_data, eval_data=None)

    def step(self, step: int) -> None:
        self.trainer.train_step(step)

    def close(self) -> None:
        self.trainer.close()


@dataclass
class Pair:
    label: str  # e.g. "deepspeed stage 2"
    strategy: str  # distrain's registered strategy name
    kwargs: Dict[str, Any] = field(default_factory=dict)
    raw: Optional[str] = None  # "module:factory" of the hand-written reference, called with the Workload
    raw_kwargs: Dict[str, Any] = field(default_factory=dict)
    raw_label: str = ""

    def missing(self) -> Optional[str]:
        """Why this pair cannot run here (a note for the report), or None."""
        why = strategy_missing(self.strategy)
        if why:
            return why
        if self.raw and _load(self.raw) is None:
            return f"the reference loop {self.raw} does not exist yet"
        return None

    def build(self, work: Workload) -> Tuple[Any, Any]:
        ours = DistrainContestant(work, self.strategy, self.kwargs)
        theirs = _load(self.raw)(work, **self.raw_kwargs) if self.raw else None
        return ours, theirs


def strategy_missing(name: str) -> Optional[str]:
    """Why distrain's strategy ``name`` cannot be used yet (not registered, or its module not written), or None."""
    if name not in STRATEGIES:
        return f"strategy {name!r} is not registered in distrain.strategies.STRATEGIES yet"
    try:
        strategy_class(name)
    except DistrainError as err:
        return f"strategy {name!r} is registered but cannot be loaded yet ({err})"
    return None


def _load(target: str) -> Optional[Callable]:
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


RAW = "benchmarks.raw_loops"
ENGINES = "benchmarks.engines"


def step_time_pairs(local_sgd_period: int = 4) -> List[Pair]:
    """Every strategy against its raw engine, in the order the report lists them."""
    pairs = [
        Pair("ddp", "ddp", raw=f"{RAW}:RawDDP", raw_label="torch DDP loop"),
        Pair("zero1", "zero1", raw=f"{RAW}:RawZeRO1", raw_label="DDP + ZeroRedundancyOptimizer loop"),
        Pair("fsdp (full shard)", "fsdp", {"reshard_after_forward": True}, raw=f"{RAW}:RawFSDP",
             raw_kwargs={"reshard_after_forward": True}, raw_label="FSDP2 fully_shard loop"),
        Pair("fsdp (shard grad op)", "fsdp", {"reshard_after_forward": False}, raw=f"{RAW}:RawFSDP",
             raw_kwargs={"reshard_after_forward": False}, raw_label="FSDP2 fully_shard loop"),
    ]
    for stage in range(4):
        pairs.append(Pair(f"deepspeed stage {stage}", "deepspeed", {"stage": stage}, raw=f"{ENGINES}:raw_deepspeed",
                          raw_kwargs={"stage": stage}, raw_label="DeepSpeed engine loop"))
    pairs.append(Pair("accelerate", "accelerate", raw=f"{ENGINES}:raw_accelerate", raw_label="Accelerate loop"))
    pairs.append(Pair(f"local_sgd (H={local_sgd_period})", "local_sgd", {"sync_every": local_sgd_period},
                      raw=f"{RAW}:RawLocalSGD", raw_kwargs={"period": local_sgd_period},
                      raw_label="PeriodicModelAverager loop"))
    return pairs


def build_on_all_ranks(label: str, build: Callable[[], Any], notes: List[str]) -> Optional[Any]:
    """``build()``, kept only when it succeeded on every rank (a contestant missing on one rank would hang the
    collectives of the others); a failure becomes a note for the report instead of ending the job."""
    from distrain import dist

    try:
        built, error = build(), None
    except Exception as err:  # an engine that cannot run here is reported, not fatal
        built, error = None, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        notes.append(f"{label}: could not be built: {errors[0]}")
        if built is not None:
            for part in built if isinstance(built, tuple) else (built,):
                if part is not None:
                    part.close()
        return None
    return built
