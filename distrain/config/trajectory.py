"""Which config keys shape the training trajectory: the one list behind the resume check and the config hash.

A resumed run may change any key below (the next step is the same optimisation); every other key may not.
``config_hash`` fingerprints exactly the keys that may not change, so two runs with the same hash follow the
same trajectory, and ``distrain.checkpoint.compat`` refuses a resume whose config differs outside this list.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

# Dotted prefixes of keys a resumed run may set differently from the run that saved: how long to train, how often
# to log, evaluate and save, whether to accept other data (train.resume_data: the data themselves are compared
# apart, by fingerprint), the micro-batch (global_batch = micro x accum x world stays fixed, so only float
# rounding moves), the world size, how data is loaded (workers and prefetch change where a sample is fetched,
# never which sample or its random draws), the process group settings and the run's location; and how the same
# model is built and run (meta or eager build, torch.compile, activation checkpointing, the optimizer's kernel),
# which change speed and memory, and the step at most by float rounding. Where the data live (data.kwargs.path) may
# change too: a corpus moved to another disk is the same data, and what the data are is compared by fingerprint.
RESUME_MAY_CHANGE = (
    "run.name", "run.dir", "train.steps", "train.resume", "train.resume_data", "train.log_every", "train.eval_every",
    "train.micro_batch", "train.micro_batch_max", "data.kwargs.path",
    "data.eval_batch", "data.num_workers", "data.pin_memory", "data.prefetch_factor", "data.persistent_workers",
    "dist", "checkpoint", "metrics", "faults", "model.init", "train.compile", "train.compile_options",
    "train.activation_checkpointing", "train.blocks", "train.optimizer_impl",
    # fsdp's mesh (HSDP replicas x shards): DCP reshards on load, and every mesh takes the same step
    "strategy.kwargs.replicate",
)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a leaf, so adding kwargs is seen as a change."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# The config section a resume may change when the checkpoint's strategy and this run's are both exact and portable
# (distrain.checkpoint.conversion decides; the resume check is told so).
STRATEGY = "strategy"


def without_changeable(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``tree`` less the keys a resume may change, so that a section holding only those (strategy.kwargs with just
    replicate) reads as the empty section of a config without them."""
    return {k: without_changeable(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in tree.items() if not may_change_on_resume(f"{prefix}{k}")}


def may_change_on_resume(key: str) -> bool:
    return _under(key, RESUME_MAY_CHANGE)


def may_change_on_strategy_change(key: str) -> bool:
    """Whether ``key`` is part of the strategy section (free to change under an exact strategy conversion)."""
    return _under(key, (STRATEGY,))


def _under(key: str, prefixes: tuple) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_hash(cfg: DictConfig, strategy_exact: bool = False) -> str:
    """A short fingerprint of everything that shapes the trajectory (the keys a resume may not change).

    ``strategy_exact``: the strategy reproduces one rank with its strategy.kwargs (``Strategy.exact_for``), so the
    trajectory is one-rank training's under any exact strategy, and a resume may switch between them
    (distrain.checkpoint.conversion): the strategy section then counts as the one value "exact".
    """
    data = flatten(without_changeable(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]
    kept = {k: v for k, v in data.items() if not (strategy_exact and may_change_on_strategy_change(k))}
    if strategy_exact:
        kept[STRATEGY] = "exact"
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
