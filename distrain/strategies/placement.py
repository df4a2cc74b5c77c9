"""What a strategy keeps on each rank and what it communicates per step: the description `distrain plan` reads.

Each Strategy class declares its own ``layouts()`` (one per meaningful option set, e.g. FSDP's two reshard modes),
so adding a strategy adds its memory and traffic model in the same file, and the planner has no list of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# Layout.replicate for HSDP with one replica per node: the planner resolves it to the number of nodes.
AUTO_REPLICATE = 0

# Which model states a layout keeps whole on every rank ("full") or split over the N ranks ("shard").
FULL, SHARD = "full", "shard"


@dataclass(frozen=True)
class Layout:
    """How one strategy (with its kwargs) places model states and what it communicates per step."""

    label: str
    strategy: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    params: str = FULL
    grads: str = FULL
    optimizer: str = FULL
    # DeepSpeed's fp32 master copy of the weights, kept with the optimizer: in fp32 runs too (stages 1-3 step on
    # a separate fp32 copy of the partition), and in bf16/fp16 runs (stages 1-3 sharded, stage 0 whole).
    master_fp32: str = ""
    master_half: str = ""
    half_precision_states: bool = False  # DeepSpeed keeps bf16/fp16 params and grads in bf16/fp16 runs
    # Communication, in units of the model's gradient (= parameter) bytes:
    reduce_every_micro_step: bool = False  # gradients reduced on every micro-step (DeepSpeed ZeRO-2/3)
    sharded_reduce: bool = False  # a reduce-scatter where the backend has one (NCCL); gloo all-reduces instead
    gathers_per_step: float = 0.0  # parameter all-gathers / broadcasts after the update (ZeRO-1/2)
    gathers_per_micro_step: float = 0.0  # parameter all-gathers in forward (and backward) of each micro-step
    # DeepSpeed ZeRO-3 keeps gathered parameters for backward while the model is under its live-parameter limit
    # (stage3_max_live_parameters, 1e9 by default), and gathers them again in backward above it.
    regather_in_backward_above: Optional[float] = None
    every: int = 1  # communicates every `every` steps (local SGD's period)
    exact: bool = True  # reproduces 1 rank (sync every step); only exact layouts are recommended
    peak_unsharded: str = ""  # what a sharded layout gathers transiently during the step ("unit" | "model")
    speed_rank: int = 0  # tie-break among equal traffic: fewer collectives and less engine machinery first
    # HSDP: "shard" states split over the W/R ranks of one of R replicas, whose gradient shards are then all-reduced
    # across replicas. 1: one replica (plain sharding over all W); AUTO_REPLICATE: one replica per node.
    replicate: int = 1
