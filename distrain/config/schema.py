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
    name: str = "run"  # the run directory is <dir>/<name>; one plain directory name (no '/', not '.' or '..')
    dir: str = "runs"  # parent directory of the run directories
    seed: int = 0  # seeds model init and the data permutation; equal on every rank
    # Rank 0 holds <run dir>/run.lock while the run lives (refreshed every 10 s), and a second run into the same
    # directory is refused. A lock left by a killed process is reclaimed at once on the same host (its pid is
    # gone); from another host, whose processes cannot be checked, once it has not been refreshed for this long.
    lock_grace_s: float = 600.0


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
    # a built-in: digits | text | regression | tokens | images | hf (ignored when datasets are passed to Trainer)
    name: str = "digits"
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the dataset's arguments, e.g. tokens: {path: shards/}
    eval_fraction: float = 0.2  # share of the samples held out for evaluation (when the data has no eval split)
    eval_batch: int = 256  # per-rank batch size during evaluation
    # DataLoader worker processes per rank; 0 loads in the training process; null = 0 for in-memory tensor data
    # (digits, text, regression, a TensorDataset), else the CPUs per rank minus one, at most 8
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None  # page-locked batches for asynchronous copies; null = on when training on CUDA
    prefetch_factor: Optional[int] = None  # micro-batches each worker loads ahead; null = enough for the next step
    persistent_workers: bool = True  # keep workers between evaluations and restarts (with num_workers > 0)
    # how samples become a batch: package.module:function (Trainer(collate_fn=...) takes a callable); null =
    # torch's default_collate, per key for dict samples
    collate_fn: Optional[str] = None


@dataclass
class PruneConfig:
    amount: float = 0.0  # fraction of the selected weights set to zero, in [0, 1); 0 = no pruning
    method: str = "l1_unstructured"  # l1_unstructured: the smallest magnitudes go first
    scope: str = "global"  # global (one threshold over every selected weight) | layer (each tensor its own)
    start: int = 0  # the step pruning starts at (0: the initial weights)
    end: Optional[int] = None  # the step the full amount is reached (cubic ramp from start); null = 3/4 of train.steps
    every: int = 10  # steps between two mask updates from start to end
    # every nn.Linear / nn.Conv* weight is pruned; globs on parameter names add others (embeddings and norms only
    # when named here) ...
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)  # ... or leave some out, e.g. ["*.head.weight"]


@dataclass
class TrainConfig:
    global_batch: int = 64  # samples per optimizer step, summed over all ranks: the invariant
    # samples per forward/backward on one rank: a positive integer; None = global_batch / world; auto = the
    # largest divisor of global_batch / world that fits, found by retrying a step that ran out of memory at the
    # next smaller divisor (docs/out-of-memory.md)
    micro_batch: Optional[Any] = None
    micro_batch_max: Optional[int] = None  # with micro_batch=auto: where the search starts (None: global_batch / world)
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
    # A resume on data other than the checkpoint's (its length, token shard checksums or sampled items differ from
    # the fingerprint the checkpoint records): check (refuse it, naming what differs) | accept (resume on the new
    # data, with a warning)
    resume_data: str = "check"
    # A non-finite loss or gradient norm: stop (exit 1, naming the step) | skip_step (drop that step's update,
    # on every rank alike) | warn (log it and go on). A checkpoint of non-finite weights is never committed.
    on_nonfinite: str = "stop"
    prune: PruneConfig = field(default_factory=PruneConfig)  # magnitude pruning on a schedule (docs/compression.md)
    qat: str = "none"  # none | int8: quantization-aware training, fake-quantized int8 weights per channel (torchao)
    qat_start: int = 0  # the step quantization-aware training starts at (train.qat)


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
class MLflowConfig:
    # e.g. http://mlflow:5000, sqlite:///mlflow.db or file:///path; "" = MLFLOW_TRACKING_URI, else ./mlruns
    tracking_uri: str = ""
    experiment: str = "distrain"  # experiment name, created when it does not exist


@dataclass
class WandbConfig:
    project: str = "distrain"  # W&B project
    entity: str = ""  # team or user; "" = your default entity
    mode: str = "online"  # online | offline (write locally; `wandb sync` later) | disabled


@dataclass
class ProfileConfig:
    start: int = 1  # the first profiled step, counted from 0 (ProfilerStep#<start> in the trace)
    steps: int = 0  # how many steps to record; 0 = profiling off (the default: no cost)
    ranks: Any = "all"  # all, or a list of ranks, e.g. [0]
    memory: bool = False  # also record tensor allocations and shapes (profile_memory, record_shapes)


@dataclass
class MetricsConfig:
    # Experiment trackers fed by rank 0, besides metrics.jsonl: any of tensorboard, mlflow, wandb. Each gets the
    # resolved config, every metrics and eval record, and at the end config.yaml and the final checkpoint's path;
    # a resumed run continues the same tracker run. A tracker that fails warns once; training goes on.
    trackers: List[str] = field(default_factory=list)
    tensorboard: bool = False  # the older spelling of trackers: [tensorboard] (event files in <run dir>/tensorboard)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)  # settings of the mlflow tracker
    wandb: WandbConfig = field(default_factory=WandbConfig)  # settings of the wandb tracker
    # How long rank 0 lets the trackers flush at the run's end, after the last collective (no other rank waits);
    # a tracker still busy then (a slow or unreachable server) is named in one warning and left behind.
    tracker_timeout_s: float = 10.0
    progress: str = "auto"  # auto (bar on a TTY, plain lines otherwise) | bar | plain | none
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up a table, or skip
    # Stragglers: on every log step each rank's own data and compute time (without waiting for peers) is compared
    # with the median rank's; a rank >= straggler_factor x slower for straggler_window log steps in a row is warned
    # about once (its rank, host and slow phase). metrics.jsonl gets step_s_ranks and slowest_rank. 0 = off.
    straggler_factor: float = 1.5
    straggler_window: int = 3  # log steps in a row a rank must lag before the warning
    # torch.profiler traces of a few steps: one gzipped Chrome/Perfetto trace per selected rank in <run dir>/profile/
    # (rank<R>_steps<S>-<E>.json.gz), distrain's phases labelled: split, forward, backward, grad-sync, optimizer,
    # sync, checkpoint. TensorBoard's profiler plugin and ui.perfetto.dev read them.
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Record the CUDA allocator's history and, on an out-of-memory error, write it to
    # <run dir>/memory/oom_rank<R>_step<S>.pickle (open it at https://pytorch.org/memory_viz); nothing on a CPU
    memory_snapshot: bool = False


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
    "train.on_nonfinite": ("stop", "skip_step", "warn"),
    "train.resume_data": ("check", "accept"),
    "train.prune.method": ("l1_unstructured",),
    "train.prune.scope": ("global", "layer"),
    "train.qat": ("none", "int8"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "dist.device": ("auto", "cpu", "cuda"),
    "metrics.progress": ("auto", "bar", "plain", "none"),
    "metrics.wandb.mode": ("online", "offline", "disabled"),
}

TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")  # what metrics.trackers may list
