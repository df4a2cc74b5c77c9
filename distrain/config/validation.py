"""Checks beyond the types: value ranges and choices, and the batch arithmetic for a world size.

``validate`` runs on every load (world-independent); ``batch_plan`` derives grad_accum from
``global_batch = micro_batch x grad_accum x world_size`` or explains in one paragraph why it cannot.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from distrain.compression.checks import check_compression
from distrain.config.schema import CHOICES, COMPILE_OPTIONS, FAULT_SIGNALS, TRACKER_NAMES, Config
from distrain.errors import ConfigError
from distrain.registry import is_import_path

AUTO = "auto"  # train.micro_batch=auto


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"Config key '{key}' has value {value!r}; {allowed}.", key=key)


def float_keys(cls: type = Config, prefix: str = "") -> Iterator[str]:
    """Every config key the schema types as a float (or a list of floats), dotted."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from float_keys(tp, f"{prefix}{f.name}.")
        elif tp in (float, Optional[float], List[float]):
            yield f"{prefix}{f.name}"


FLOAT_KEYS = tuple(float_keys())


def _check_finite(cfg: DictConfig) -> None:
    """No float knob means anything at inf or nan (a learning rate, a timeout, a grace period): refuse them all."""
    for key in FLOAT_KEYS:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_list(value):
            value = list(value)
        values = value if isinstance(value, list) else [value]
        _require(all(v is None or math.isfinite(v) for v in values), key, value,
                 "it must be finite (inf and nan are not allowed)")


def check_run_name(name: Any) -> None:
    """run.name is one plain directory name inside run.dir: never '..', '.', an absolute path, or a path."""
    plain = (isinstance(name, str) and name.strip() != "" and name not in (".", "..")
             and not any(sep in name for sep in ("/", "\\", "\0")))
    _require(plain, "run.name", name,
             "it must be one plain directory name (not empty, not '.' or '..', no '/' or '\\'): the run directory is "
             "run.dir/run.name, and nothing may be written outside it. Put parent directories in run.dir instead")


def checkpoint_every(mode: Any) -> int:
    """``train.activation_checkpointing`` as a block stride: 0 for none, 1 for full, N for every:N. The one parser
    of the key: validation runs it when the config loads, apply_activation_checkpointing when it applies it."""
    match = re.fullmatch(r"none|full|every:([1-9][0-9]*)", str(mode))
    _require(match is not None, "train.activation_checkpointing", mode,
             "allowed values are none, full, or every:N with N >= 1 (checkpoint every N-th block)")
    assert match is not None
    return 0 if match.group(0) == "none" else int(match.group(1) or 1)


def validate(cfg: DictConfig) -> None:
    """Range and choice checks that do not depend on the world size."""
    _check_finite(cfg)
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _require(value in choices, key, value, f"allowed values are {', '.join(choices)}")
    _validate_train(cfg.train)
    check_compression(cfg)  # train.prune / train.qat
    _validate_data(cfg.data)
    _require(0 < cfg.dist.timeout_s <= 1e9, "dist.timeout_s", cfg.dist.timeout_s,
             "it must be a positive, finite number of seconds (at most 1e9)")
    _validate_checkpoint_and_run(cfg)
    _validate_metrics(cfg.metrics)
    _validate_profile(cfg.metrics.profile, cfg.train.steps)
    _validate_faults(cfg.faults)


def _validate_train(t: DictConfig) -> None:
    _require(t.global_batch >= 1, "train.global_batch", t.global_batch, "it must be a positive integer")
    _require(t.micro_batch is None or t.micro_batch == AUTO
             or (isinstance(t.micro_batch, int) and not isinstance(t.micro_batch, bool) and t.micro_batch >= 1),
             "train.micro_batch", t.micro_batch, "it must be a positive integer, null (to use global_batch / "
             "world_size) or auto (the largest that fits in memory, found by retrying at the next smaller divisor)")
    _require(t.micro_batch_max is None or t.micro_batch_max >= 1, "train.micro_batch_max", t.micro_batch_max,
             "it must be a positive integer (where micro_batch=auto starts its search), or null")
    _require(t.steps >= 1, "train.steps", t.steps, "it must be a positive integer")
    _require(t.lr > 0, "train.lr", t.lr, "it must be a positive number")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", list(t.betas),
             "it must be two numbers in [0, 1), for example [0.9, 0.999]")
    _require(t.eps > 0, "train.eps", t.eps, "it must be a positive number")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "it must be zero or positive")
    _require(0 <= t.momentum < 1, "train.momentum", t.momentum, "it must be in [0, 1)")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "it must be zero or positive")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "it must be in [0, 1]")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "it must be zero (off) or positive")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "it must be zero (only at the end) or positive")
    _require(t.log_every >= 1, "train.log_every", t.log_every, "it must be a positive integer")
    _require(bool(t.resume), "train.resume", t.resume, "use auto, never, or a checkpoint path")
    checkpoint_every(t.activation_checkpointing)
    stray = sorted(set(t.compile_options) - set(COMPILE_OPTIONS))
    _require(not stray, "train.compile_options", dict(t.compile_options),
             f"{', '.join(stray)} is not a torch.compile argument distrain passes on (allowed: "
             f"{', '.join(COMPILE_OPTIONS)})")
    _require(all(isinstance(r, str) and r for r in t.decay_exclude), "train.decay_exclude", list(t.decay_exclude),
             "each entry is bias, norm, embedding, 1d or a glob on parameter names")
    _require(t.blocks is None or (len(t.blocks) > 0 and all(isinstance(b, str) and b for b in t.blocks)),
             "train.blocks", t.blocks, "use null (every child of an nn.ModuleList) or a list of module class names")


def _validate_data(d: DictConfig) -> None:
    _require(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "it must be in [0, 1)")
    _require(d.eval_batch >= 1, "data.eval_batch", d.eval_batch, "it must be a positive integer")
    _require(d.num_workers is None or d.num_workers >= 0, "data.num_workers", d.num_workers,
             "it must be 0 (load in the training process), a positive number of DataLoader worker processes per "
             "rank, or null (chosen from the CPU count)")
    _require(d.prefetch_factor is None or d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor,
             "it must be a positive number of micro-batches per worker, or null (enough for the next step)")


def _validate_checkpoint_and_run(cfg: DictConfig) -> None:
    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", c.every, "it must be zero (off) or positive")
    _require(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "it must be zero (off) or positive")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "it must be at least 1")
    _require(c.keep_every >= 0, "checkpoint.keep_every", c.keep_every, "it must be zero (off) or positive")
    check_run_name(cfg.run.name)
    _require(cfg.run.lock_grace_s >= 60, "run.lock_grace_s", cfg.run.lock_grace_s,
             "it must be at least 60 seconds (the holder refreshes the lock every 10 s; a shorter grace could take "
             "the lock of a live run on another host)")


def _validate_metrics(m: DictConfig) -> None:
    _require(m.peak_flops >= 0, "metrics.peak_flops", m.peak_flops, "it must be zero or positive")
    _require(0 < m.tracker_timeout_s <= 3600, "metrics.tracker_timeout_s", m.tracker_timeout_s,
             "it must be a positive number of seconds, at most 3600")
    _require(m.straggler_factor == 0 or m.straggler_factor > 1, "metrics.straggler_factor", m.straggler_factor,
             "it must be 0 (straggler tracking off) or greater than 1, e.g. 1.5 (a rank 1.5x slower than the median "
             "rank)")
    _require(m.straggler_window >= 1, "metrics.straggler_window", m.straggler_window,
             "it must be a whole number of log steps, at least 1")
    trackers = list(m.trackers)
    _require(all(t in TRACKER_NAMES or is_import_path(t) for t in trackers) and len(set(trackers)) == len(trackers),
             "metrics.trackers", trackers, f"list each of {', '.join(TRACKER_NAMES)} (or your own Tracker subclass as "
             f"'package.module:Class') at most once, e.g. [tensorboard, mlflow]")


def selected_ranks(ranks: Any, world_size: Optional[int]) -> List[int]:
    """``metrics.profile.ranks`` as a list of ranks: "all", or distinct ranks below ``world_size`` (None: not known
    yet, any rank >= 0); a ConfigError otherwise."""
    if ranks == "all":
        return list(range(world_size or 0))
    listed = list(ranks) if isinstance(ranks, (list, tuple, ListConfig)) else []
    limit = world_size if world_size is not None else math.inf
    if not listed or len(set(listed)) != len(listed) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 0 <= r < limit for r in listed):
        within = (f"between 0 and {world_size - 1} (this job has world_size={world_size})" if world_size is not None
                  else "(0, 1, ...)")
        raise ConfigError(f"Config key 'metrics.profile.ranks' has value {ranks!r}; it must be 'all' or a non-empty "
                          f"list of distinct ranks {within}, e.g. [0] or [0, 1].", key="metrics.profile.ranks")
    return listed


def _validate_profile(profile: DictConfig, total_steps: int) -> None:
    """``metrics.profile`` (distrain.telemetry.profiling) as far as it needs no world size (the ranks are checked
    against it when a run starts)."""
    start, steps = profile.start, profile.steps
    if not (isinstance(steps, int) and steps >= 0):
        raise ConfigError(f"Config key 'metrics.profile.steps' has value {steps!r}; it must be 0 (profiling off) or "
                          f"the number of steps to record, e.g. 2.", key="metrics.profile.steps")
    if not (isinstance(start, int) and 0 <= start) or (steps and start + steps > total_steps):
        raise ConfigError(f"Config key 'metrics.profile.start' has value {start!r} with metrics.profile.steps="
                          f"{steps}; the profiled steps start..start+steps-1 must lie within the run's steps 0.."
                          f"{total_steps - 1} (train.steps={total_steps}).", key="metrics.profile.start")
    if steps:
        selected_ranks(profile.ranks, world_size=None)


def _validate_faults(f: DictConfig) -> None:
    for key in ("signals", "requeue_signals"):
        names = [str(n).upper().removeprefix("SIG") for n in f[key]]
        _require(all(n in FAULT_SIGNALS for n in names), f"faults.{key}", list(f[key]),
                 f"allowed signal names are {', '.join(FAULT_SIGNALS)} (an empty list turns signal handling off)")
    stray = sorted({str(n).upper().removeprefix("SIG") for n in f.requeue_signals} -
                   {str(n).upper().removeprefix("SIG") for n in f.signals})
    _require(not stray, "faults.requeue_signals", list(f.requeue_signals),
             f"every requeue signal must also be in faults.signals ({', '.join(stray)} is not)")


def surprises(cfg: DictConfig, has_eval_data: bool) -> List[str]:
    """Settings that are allowed but probably not what was meant: one line each, for the run to log as warnings."""
    t = cfg.train
    lines = []
    if t.warmup_steps > t.steps:
        lines.append(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the learning rate "
                     f"never reaches train.lr={t.lr:g} (it ends at {t.lr * t.steps / t.warmup_steps:.3g})")
    if t.eval_every and not has_eval_data:
        lines.append(f"train.eval_every={t.eval_every}, but there is no eval data (data.eval_fraction=0, or no "
                     f"eval_data passed to Trainer): nothing will be evaluated")
    return lines


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over ranks and micro-steps."""

    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int
    auto: bool = False  # train.micro_batch=auto: micro_batch is where the search stands (smaller after an OOM)

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum


def batch_plan(cfg: DictConfig, world_size: int) -> BatchPlan:
    """Derive grad_accum from global_batch = micro_batch x grad_accum x world_size, or explain why it can't."""
    g, w = int(cfg.train.global_batch), int(world_size)
    if g < w:
        raise ConfigError(
            f"train.global_batch={g} is smaller than world_size={w}: each of the {w} ranks needs at least one sample "
            f"per step. Raise train.global_batch to a multiple of {w} (e.g. {w * max(1, -(-g // w))}), or use at most "
            f"{g} workers.", key="train.global_batch")
    if g % w:
        raise ConfigError(
            f"train.global_batch={g} cannot be split over world_size={w} ranks: it must be a multiple of the "
            f"world size (each rank takes an equal slice). Choose a global batch divisible by {w}, "
            f"or run with a world size that divides {g}.", key="train.global_batch")
    per_rank = g // w
    if cfg.train.micro_batch == AUTO:
        return auto_plan(g, w, cfg.train.micro_batch_max)
    m = int(cfg.train.micro_batch) if cfg.train.micro_batch is not None else per_rank
    if per_rank % m:
        raise ConfigError(
            f"train.global_batch={g} with train.micro_batch={m} and world_size={w} does not divide: "
            f"global_batch must equal micro_batch x grad_accum x world_size, and {g} / ({m} x {w}) is not an "
            f"integer. Pick a micro_batch that divides {per_rank} (the per-rank share), e.g. "
            f"{_divisor_hint(per_rank, m)}.", key="train.micro_batch")
    return BatchPlan(global_batch=g, world_size=w, micro_batch=m, grad_accum=per_rank // m)


def auto_plan(global_batch: int, world_size: int, start: Optional[int] = None) -> BatchPlan:
    """train.micro_batch=auto: the largest divisor of the per-rank share that is at most ``start`` (default: the
    share itself), the micro-batch the search tries first."""
    per_rank = global_batch // world_size
    m = max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and (start is None or d <= start))
    return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=m, grad_accum=per_rank // m,
                     auto=True)


def smaller_plan(plan: BatchPlan) -> Optional[BatchPlan]:
    """The same plan at the next smaller divisor of the per-rank share (None at micro-batch 1)."""
    if plan.micro_batch == 1:
        return None
    return auto_plan(plan.global_batch, plan.world_size, plan.micro_batch - 1)


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), -d))


def elastic_batch_plans(cfg: DictConfig, world_sizes: Sequence[int]) -> List[BatchPlan]:
    """The batch plan at every world size an elastic job may have (``--nnodes MIN:MAX``), or one paragraph naming
    the world sizes that do not divide and one global batch that fits them all.

    Every size W needs micro_batch x W to divide the global batch, so the global batches that fit all of them are
    the multiples of micro_batch x lcm(W...) (of lcm(W...) alone when micro_batch is null: it is then G / W)."""
    sizes = sorted({int(w) for w in world_sizes})
    if len(sizes) == 1:
        return [batch_plan(cfg, sizes[0])]
    plans, failing = [], []
    for w in sizes:
        try:
            plans.append(batch_plan(cfg, w))
        except ConfigError:
            failing.append(w)
    if not failing:
        return plans
    g, m = int(cfg.train.global_batch), cfg.train.micro_batch
    m = None if m == AUTO else m  # auto picks a divisor at every world size, as null does
    unit = math.lcm(*sizes) * (int(m) if m is not None else 1)
    fit = unit * max(1, -(-g // unit))  # the smallest multiple of unit that is at least the configured batch
    micro = f"train.micro_batch={m} x " if m is not None else ""
    raise ConfigError(
        f"train.global_batch={g} does not split over every world size this elastic job can have "
        f"({', '.join(map(str, sizes))} ranks): it fails at {', '.join(map(str, failing))}. Each world size W needs "
        f"a global batch divisible by {micro}W, so use a multiple of {micro}{math.lcm(*sizes)} (the least common "
        f"multiple of the world sizes), e.g. train.global_batch={fit}, or a narrower node range.",
        key="train.global_batch")
