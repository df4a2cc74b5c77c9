"""Range checks of train.prune and train.qat, torch-free so that a mistake fails before any worker starts."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from distrain.errors import ConfigError

# Strategies whose gradients QAT sums in float64 (bit-identical at every world size: compression.float64_grads).
FLOAT64_GRAD_STRATEGIES = ("ddp", "zero1")


def sums_qat_grads_in_float64(strategy: str, kwargs: Mapping[str, Any], auto_micro_batch: bool) -> bool:
    """Whether QAT's gradients are summed in float64 under ``strategy`` with these strategy.kwargs: ddp and zero1,
    unless a comm hook compresses them (lossy anyway), DDP's static graph forbids skipping its all-reduce (no_sync
    breaks under it, distrain.strategies.ddp) or train.micro_batch=auto rejoins an out-of-memory rank through DDP's
    reducer (distrain.strategies.ddp_join); there the engine's float32 reduction stays."""
    return (strategy in FLOAT64_GRAD_STRATEGIES and kwargs.get("comm_hook") is None
            and not kwargs.get("static_graph", False) and not auto_micro_batch)
# Strategies whose ranks hold different weights between syncs: their magnitudes, so their masks, would differ.
NO_PRUNING = {
    "local_sgd": "local SGD ranks train apart between syncs, so their weights (and magnitude masks) differ",
}


def _require(cond: bool, key: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"Config key '{key}' has value {value!r}; {allowed}.", key=key)


def check_compression(cfg: DictConfig) -> None:
    """train.prune.* and train.qat_start ranges (the choices are checked with every other choice)."""
    t = cfg.train
    p = t.prune
    _require(0 <= p.amount < 1, "train.prune.amount", p.amount,
             "it must be in [0, 1): the fraction of the selected weights set to zero (0 = no pruning)")
    _require(p.start >= 0, "train.prune.start", p.start, "it must be zero (the initial weights) or a later step")
    _require(p.end is None or p.start <= p.end <= t.steps, "train.prune.end", p.end,
             f"it must be null (3/4 of train.steps) or a step from train.prune.start={p.start} to "
             f"train.steps={t.steps}")
    _require(p.every >= 1, "train.prune.every", p.every, "it must be a positive number of steps")
    for key in ("include", "exclude"):
        _require(all(isinstance(g, str) and g for g in p[key]), f"train.prune.{key}", list(p[key]),
                 "each entry is a glob on parameter names, e.g. '*.embed.weight'")
    _require(0 <= t.qat_start < t.steps or t.qat == "none", "train.qat_start", t.qat_start,
             f"it must be a step from 0 to train.steps - 1 = {t.steps - 1}")
    why = NO_PRUNING.get(str(cfg.strategy.name))
    if p.amount > 0 and why:
        raise ConfigError(f"train.prune.amount={p.amount} cannot be combined with strategy.name="
                          f"{cfg.strategy.name!r}: {why}. Prune with ddp, zero1, fsdp or deepspeed (sharded strategies "
                          f"compute the threshold from each rank's shards), or set train.prune.amount=0.", key="train.prune.amount")


def inexact_compression(cfg: DictConfig) -> Optional[str]:
    """Why compression keeps W ranks from reproducing 1 rank to float rounding (`distrain verify`), or None.

    QAT rounds every linear weight to the int8 grid in the forward: a weight a last bit away from a rounding tie
    lands a whole grid step away, and the optimizer carries that on. Under ddp and zero1, QAT sums the gradients in
    float64 (distrain.compression.float64_grads), so every world size has the same weights to the bit and no last
    bit to differ in; the other strategies (and static_graph, micro_batch=auto) reduce in float32 in an order that
    depends on the world size. Pruning's threshold is a tie too, but an exact one (integer counts), and one weight
    at most."""
    kwargs = cfg.strategy.get("kwargs") or {}
    auto = cfg.train.get("micro_batch") == "auto"
    if cfg.train.qat != "none" and not sums_qat_grads_in_float64(cfg.strategy.name, kwargs, auto):
        return (f"train.qat={cfg.train.qat} rounds weights to the int8 grid, and strategy.name="
                f"{cfg.strategy.name!r} with these settings sums gradients in float32 in an order that depends on "
                f"the world size (only {' and '.join(FLOAT64_GRAD_STRATEGIES)}, without static_graph, comm_hook or "
                f"micro_batch=auto, sum QAT's gradients in float64), so a last-bit difference next to a rounding tie "
                f"becomes a grid step")
    return None


def prune_end(cfg_train: DictConfig) -> int:
    """The step the full amount is reached: train.prune.end, or 3/4 of train.steps (a quarter left to recover)."""
    p = cfg_train.prune
    return int(p.end) if p.end is not None else max(int(p.start), int(cfg_train.steps) * 3 // 4)
