"""The one config schema: every knob a user can turn, declared once as dataclasses with a comment each.

OmegaConf checks keys and types against these dataclasses (``distrain.config.loading``); ranges and the batch
arithmetic are checked in ``distrain.config.validation``; docs/config-reference.md is generated from this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from omegaconf import DictConfig


@dataclass
class RunConfig:
    name: str = "run"  # the run directory is <dir>/<name>
    dir: str = "runs"  # parent directory of the run directories
    seed: int = 0  # seeds model init and the data permutation; equal on every rank


@dataclass
class ModelConfig:
    name: str = "mlp"  # a built-in: mlp | cnn | lstm | gpt (ignored when a model object is passed to Trainer)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the builder's arguments, e.g. {hidden: 256, depth: 3}
    # auto: build on the meta device, shard, then initialise shard by shard (no rank holds the whole model) when
    # the model's modules initialise themselves (reset_parameters/init_weights), else build it whole on every
    # rank, saying why | meta: the same, but refuse a model that cannot | eager: always build it whole
    init: str = "auto"


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
    optimizer_impl: str = "auto"  # auto (fused kernel on CUDA, torch's default elsewhere) | fused | foreach | for_loop
    lr: float = 1e-3  # peak learning rate (after warmup)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw moment decay rates
    eps: float = 1e-8  # adam/adamw denominator term
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd/adam
    # parameters weight_decay skips (a second group with weight_decay 0): keywords bias | norm | embedding | 1d,
    # or globs on parameter names such as "*.pos.weight"; [] decays everything
    decay_exclude: List[str] = field(default_factory=lambda: ["bias", "norm", "embedding"])
    momentum: float = 0.0  # sgd only
    lr_schedule: str = "constant"  # constant | cosine (both after a linear warmup)
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    eval_every: int = 0  # steps between evaluations; 0 = only at the end (if there is eval data)
    log_every: int = 10  # steps between metrics records (and console lines)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    compile: bool = False  # torch.compile each block (or the whole model) in place, for training steps only
    # torch.compile arguments: backend, mode, fullgraph, dynamic, options
    compile_options: Dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: str = "none"  # none | full | every:N (recompute every N-th block in backward)
    # the model's repeated blocks, units of compile and activation checkpointing: null = every child of an
    # nn.ModuleList (the built-in gpt's blocks); or class names, e.g. [MyBlock]
    blocks: Optional[List[str]] = None
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


# The torch.compile arguments train.compile_options may set.
COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], Config, DictConfig, None]

CHOICES: Dict[str, Sequence[str]] = {
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.optimizer_impl": ("auto", "fused", "foreach", "for_loop"),
    "model.init": ("auto", "meta", "eager"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "dist.device": ("auto", "cpu", "cuda"),
    "metrics.progress": ("auto", "bar", "plain", "none"),
}
