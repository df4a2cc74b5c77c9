"""The one config: a dataclass schema, loaded from YAML plus ``key=value`` overrides, validated with dotted keys.

Every knob a user can turn is declared here once. OmegaConf checks keys and types against the dataclasses;
``validate`` checks ranges and the batch arithmetic (``global_batch = micro_batch x grad_accum x world``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distrain.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "run"  # the run directory is <dir>/<name>
    dir: str = "runs"  # parent directory of the run directories
    seed: int = 0  # seeds model init and the data permutation; equal on every rank


@dataclass
class ModelConfig:
    name: str = "mlp"  # a built-in: mlp | cnn | lstm | gpt (ignored when a model object is passed to Trainer)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the builder's arguments, e.g. {hidden: 256, depth: 3}


@dataclass
class DataConfig:
    name: str = "digits"  # a built-in: digits | text | regression (ignored when datasets are passed to Trainer)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the dataset's arguments, e.g. text: {block_size: 128}
    eval_fraction: float = 0.2  # share of the samples held out for evaluation
    eval_batch: int = 256  # per-rank batch size during evaluation


@dataclass
class TrainConfig:
    global_batch: int = 64  # samples per optimizer step, summed over all ranks: the invariant
    micro_batch: Optional[int] = None  # samples per forward/backward on one rank; None = global_batch / world
    steps: int = 100  # optimizer steps to train for (in total, across resumes)
    optimizer: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3  # peak learning rate (after warmup)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw moment decay rates
    eps: float = 1e-8  # adam/adamw denominator term
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd/adam
    momentum: float = 0.0  # sgd only
    lr_schedule: str = "constant"  # constant | cosine (both after a linear warmup)
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    eval_every: int = 0  # steps between evaluations; 0 = only at the end (if there is eval data)
    log_every: int = 10  # steps between metrics records (and console lines)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    resume: str = "auto"  # auto | never | PATH to a checkpoint


@dataclass
class StrategyConfig:
    name: str = "ddp"  # a registered strategy (docs/strategies.md), or your own as package.module:ClassName
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the strategy's options, e.g. ddp: {bucket_cap_mb: 50}


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: float = 300.0  # a collective that takes longer fails, naming the rank and collective
    device: str = "auto"  # auto | cpu | cuda


# Signals a run may take as "checkpoint and stop" (with or without the SIG prefix, any case).
FAULT_SIGNALS = ("USR1", "USR2", "TERM", "HUP", "INT")


@dataclass
class FaultsConfig:
    # On any of these signals every rank stops after the same step, commits a checkpoint and exits 0. USR1 is
    # what SLURM's --signal=USR1@SECONDS sends before the time limit; TERM is plain scancel, a preempting
    # scheduler or torchrun's agent shutting down. An empty list leaves the process's signals alone.
    signals: List[str] = field(default_factory=lambda: ["USR1", "TERM"])
    requeue: bool = True  # under SLURM, `scontrol requeue` the job after that checkpoint (see requeue_signals)
    # The signals (among faults.signals) after which the job also requeues itself. Not TERM by default: that
    # is also a user's plain scancel, which must end the job.
    requeue_signals: List[str] = field(default_factory=lambda: ["USR1"])
    watchdog: bool = True  # per-rank heartbeats: a collective that times out names the ranks that did not arrive


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0 disables step-based saves
    every_minutes: float = 0.0  # minutes between saves; 0 disables time-based saves
    keep_last: int = 3  # committed checkpoints to keep (older ones are deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    async_save: bool = False  # write checkpoints in the background while training goes on
    at_end: bool = True  # save after the final step


@dataclass
class MetricsConfig:
    tensorboard: bool = False  # also write TensorBoard event files to <run dir>/tensorboard
    progress: str = "auto"  # auto (bar on a TTY, plain lines otherwise) | bar | plain | none
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up a table, or skip


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


ConfigSource = Union[str, os.PathLike, Mapping[str, Any], Config, DictConfig, None]

CHOICES: Dict[str, Sequence[str]] = {
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "dist.device": ("auto", "cpu", "cuda"),
    "metrics.progress": ("auto", "bar", "plain", "none"),
}


def _describe_omegaconf_error(err: OmegaConfBaseException, origin: str) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the dotted key and what is allowed."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        parent, _, leaf = str(key).rpartition(".")
        allowed = _allowed_keys(parent)
        hint = f" Allowed keys in '{parent or 'the top level'}': {', '.join(allowed)}." if allowed else ""
        return ConfigError(f"Unknown config key '{key}' in {origin}.{hint}", key=str(key))
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        expected = _declared_type(str(key)) or getattr(err, "ref_type", None) or getattr(err, "object_type", None)
        want = _type_name(expected) if expected is not None else "the declared type"
        return ConfigError(
            f"Config key '{key}' has value {value!r} in {origin}, which is not a valid {want}.", key=str(key)
        )
    return ConfigError(f"Config problem at '{key}' in {origin}: {err.msg if hasattr(err, 'msg') else err}", key=str(key))


def _declared_type(key: str) -> Any:
    """The annotated type of a dotted key in the schema (e.g. int for train.steps), or None."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        tp = fields[part].type
        cls = fields[part].default_factory if dataclasses.is_dataclass(fields[part].default_factory) else None
    return tp


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None) or str(tp)
    return name.replace("typing.", "")


def _allowed_keys(section: str) -> List[str]:
    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, section) if section else node
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _load_yaml(path: Union[str, os.PathLike]) -> DictConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file '{path}' is a directory. Pass the path to a YAML file inside it, for example "
                          f"configs/quickstart.yaml.", key="CONFIG")
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist (or is not a file). Pass the path to a YAML file, "
                          f"for example configs/quickstart.yaml.", key="CONFIG")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report line/column, not a traceback
        detail = " ".join(str(err).split())
        raise ConfigError(f"Config file '{path}' is not valid YAML: {detail}", key="CONFIG") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (run, model, data, train, ...), "
                          f"not a {type(loaded).__name__}.", key="CONFIG")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override '{item}' is not of the form key=value (for example train.steps=50).",
                              key=item)
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"Overrides {list(overrides)} could not be parsed: {err}", key="overrides") from None


def load_config(source: ConfigSource = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the typed config from a YAML path, a dict or a Config, then apply ``key=value`` overrides.

    Raises ConfigError for unknown keys, wrong types and out-of-range values (world-independent checks).
    """
    schema = OmegaConf.structured(Config)
    layers: List[tuple] = []
    if isinstance(source, (str, os.PathLike)):
        layers.append((_load_yaml(source), f"config file '{source}'"))
    elif isinstance(source, Config):
        layers.append((OmegaConf.structured(source), "the Config object"))
    elif isinstance(source, (Mapping, DictConfig)):
        layers.append((OmegaConf.create(dict(source) if not isinstance(source, DictConfig) else source), "the config dict"))
    elif source is not None:
        raise ConfigError(f"config must be a YAML path, a dict or a distrain Config, not {type(source).__name__}.",
                          key="config")
    if overrides:
        layers.append((_parse_overrides(overrides), "the command-line overrides"))
    cfg = schema
    for layer, origin in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _describe_omegaconf_error(err, origin) from None
    OmegaConf.set_readonly(cfg, False)
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"Config key '{key}' has value {value!r}; {allowed}.", key=key)


def validate(cfg: DictConfig) -> None:
    """Range and choice checks that do not depend on the world size."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _require(value in choices, key, value, f"allowed values are {', '.join(choices)}")
    t = cfg.train
    _require(t.global_batch >= 1, "train.global_batch", t.global_batch, "it must be a positive integer")
    _require(t.micro_batch is None or t.micro_batch >= 1, "train.micro_batch", t.micro_batch,
             "it must be a positive integer (or null to use global_batch / world_size)")
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
    d = cfg.data
    _require(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "it must be in [0, 1)")
    _require(d.eval_batch >= 1, "data.eval_batch", d.eval_batch, "it must be a positive integer")
    _require(cfg.dist.timeout_s > 0, "dist.timeout_s", cfg.dist.timeout_s, "it must be a positive number of seconds")
    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", c.every, "it must be zero (off) or positive")
    _require(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "it must be zero (off) or positive")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "it must be at least 1")
    _require(c.keep_every >= 0, "checkpoint.keep_every", c.keep_every, "it must be zero (off) or positive")
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", cfg.run.name,
             "it must be a non-empty name without '/'")
    _require(cfg.metrics.peak_flops >= 0, "metrics.peak_flops", cfg.metrics.peak_flops, "it must be zero or positive")
    f = cfg.faults
    for key in ("signals", "requeue_signals"):
        names = [str(n).upper().removeprefix("SIG") for n in f[key]]
        _require(all(n in FAULT_SIGNALS for n in names), f"faults.{key}", list(f[key]),
                 f"allowed signal names are {', '.join(FAULT_SIGNALS)} (an empty list turns signal handling off)")
    stray = sorted({str(n).upper().removeprefix("SIG") for n in f.requeue_signals} -
                   {str(n).upper().removeprefix("SIG") for n in f.signals})
    _require(not stray, "faults.requeue_signals", list(f.requeue_signals),
             f"every requeue signal must also be in faults.signals ({', '.join(stray)} is not)")


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over ranks and micro-steps."""

    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int

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
    m = int(cfg.train.micro_batch) if cfg.train.micro_batch is not None else per_rank
    if per_rank % m:
        raise ConfigError(
            f"train.global_batch={g} with train.micro_batch={m} and world_size={w} does not divide: "
            f"global_batch must equal micro_batch x grad_accum x world_size, and {g} / ({m} x {w}) is not an "
            f"integer. Pick a micro_batch that divides {per_rank} (the per-rank share), e.g. "
            f"{_divisor_hint(per_rank, m)}.", key="train.micro_batch")
    return BatchPlan(global_batch=g, world_size=w, micro_batch=m, grad_accum=per_rank // m)


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), -d))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    """A short fingerprint of everything that shapes the trajectory (not run name/dir, logging or resume)."""
    data = to_container(cfg)
    for volatile in ("run.name", "run.dir", "train.resume", "train.log_every", "train.steps", "metrics", "checkpoint",
                     "faults"):
        section, _, leaf = volatile.partition(".")
        if leaf:
            data.get(section, {}).pop(leaf, None)
        else:
            data.pop(section, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
