"""The loop: split -> train -> update -> sync. It knows nothing of DDP vs FSDP vs DeepSpeed: a strategy does.

``Trainer`` takes a config (path, dict or Config) and, optionally, the user's own model (or a zero-argument
factory), map-style Datasets and loss callable. It runs in a single process and under torchrun/SLURM alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from distrain import dist
from distrain.checkpoint import Checkpointer
from distrain.compression.qat import prepare_qat
from distrain.compression.state import Compression
from distrain.config import ConfigSource, batch_plan, load_config, surprises, to_yaml
from distrain.data import (EVAL_STEP, EvalLoader, GlobalStepSampler, LoaderOptions, StepLoader, build_datasets,
                           fetch_batch, resolve_collate_fn)
from distrain.data.collate import CollateFn
from distrain.data.fetching import BatchKey
from distrain.env import detect
from distrain.errors import ConfigError, DistributedError
from distrain.faults import FaultTolerance
from distrain.telemetry.flops import FlopsEstimate, flops_per_sample, peak_flops
from distrain.telemetry.logs import close_logging, setup_logging
from distrain.training.divergence import DivergenceGuard
from distrain.training.losses import LossFn, default_items, default_loss
from distrain.training.objective import ItemsRule, MetricFn, Objective, forward_sample
from distrain.telemetry.metrics import MetricsWriter
from distrain.telemetry.progress import Progress
from distrain.models import build_model
from distrain.models.meta_init import MetaBuildRefused, build_on_meta
from distrain.training.optim import lr_at
from distrain.training.run_dir import claim_run_dir
from distrain.telemetry.perf import StepTimer, Throughput, memory_kind, peak_memory_bytes
from distrain.telemetry.run_record import RunRecord
from distrain.strategies import StrategyContext, build_strategy, strategy_class

ModelSource = Union[nn.Module, Callable[[], nn.Module], None]
META_HINT = ("To build it sharded from birth, let every module initialise its own parameters in reset_parameters() "
             "or init_weights(), called at the end of its __init__ (docs/large-models.md); model.init=eager silences "
             "this message")
# How the model was built (Trainer.model_init), as the start-up line says it.
MODEL_INIT = {"meta": "on the meta device and initialised per shard", "eager": "whole on every rank",
              "object": "by the caller"}


def _not_a_model(got: Any) -> ConfigError:
    return ConfigError(f"model must be an nn.Module or a zero-argument function returning one; got "
                       f"{type(got).__name__}.", key="model")


class Trainer:
    def __init__(self, config: ConfigSource = None, *, model: ModelSource = None, train_data: Optional[Dataset] = None,
                 loss_fn: Optional[LossFn] = None, eval_data: Optional[Dataset] = None,
                 overrides: Sequence[str] = (), collate_fn: Optional[CollateFn] = None,
                 step_fn: Optional[Callable[..., Any]] = None,
                 frozen: Optional[Mapping[str, nn.Module]] = None, items: Optional[ItemsRule] = None,
                 metrics: Optional[Mapping[str, MetricFn]] = None,
                 device: Optional[torch.device] = None):
        """``loss_fn(outputs, target[, num_items_in_batch])``, or none for a model that returns its own ``loss``
        (Mapping batches, ``model(**batch)``), or ``step_fn(model, batch, **frozen[, num_items_in_batch])`` for any
        other computation, with ``frozen`` modules (a teacher) that are never trained. ``items``: what the loss
        averages over ('samples', 'labels' that are not -100, or batch -> count); ``metrics``: name ->
        (outputs, batch) -> (sum, count), reported by ``evaluate`` as eval_<name> = sum / count over the eval set.
        ``collate_fn``: how a micro-batch's samples become one batch (else data.collate_fn, else torch's default).
        ``device``: an integration's own device (Ray Train); else dist.device decides.
        See distrain.training.objective."""
        # What this Trainer acquires (process group, run-dir lock, log file, loaders, engine, checkpoint group,
        # threads) registers its release here as it is acquired; close() releases them newest first, and so does a
        # failing __init__.
        self._resources = contextlib.ExitStack()
        self._clean_exit = False  # set by close(): only a clean exit waits for the peers before leaving the group
        try:
            self._set_up(config, overrides, model=model, train_data=train_data, eval_data=eval_data, loss_fn=loss_fn,
                         collate_fn=collate_fn, step_fn=step_fn, frozen=frozen, items=items, metrics=metrics,
                         device=device)
        except BaseException:
            self._resources.close()
            raise

    def _set_up(self, config: ConfigSource, overrides: Sequence[str], *, model: ModelSource,
                train_data: Optional[Dataset], eval_data: Optional[Dataset], loss_fn: Optional[LossFn],
                collate_fn: Optional[CollateFn], step_fn: Optional[Callable[..., Any]],
                frozen: Optional[Mapping[str, nn.Module]], items: Optional[ItemsRule],
                metrics: Optional[Mapping[str, MetricFn]], device: Optional[torch.device]) -> None:
        self.cfg: DictConfig = load_config(config, overrides)
        self.info = detect()
        self.faults = FaultTolerance(self.cfg.faults, self.info)  # before the process group: flight recorder on
        self.plan = batch_plan(self.cfg, self.info.world_size)
        # A plain copy of train.* for the per-step hot path: a DictConfig attribute read costs ~10 us and lr_at ~100 us
        # (OmegaConf validates on every access), which on a small model is several percent of the step.
        self._train = SimpleNamespace(**OmegaConf.to_container(self.cfg.train, resolve=True))
        strategy_cls = strategy_class(self.cfg.strategy.name)
        if device is not None:  # an integration's own device (Ray Train)
            self.device = torch.device(device)
        else:
            dist.check_gpus_per_node(self.info.local_world_size, torch.cuda.device_count(), self.cfg.dist.backend,
                                     self.cfg.dist.device)
            self.device = dist.resolve_device(self.cfg.dist.device, self.info)
        backend = dist.resolve_backend(self.cfg.dist.backend, self.device)
        if self.info.distributed and not strategy_cls.needs_process_group:
            raise ConfigError(f"strategy.name={self.cfg.strategy.name!r} runs a single process, but this job has "
                              f"world_size={self.info.world_size}. Use strategy.name=ddp (or another distributed "
                              f"strategy), or launch one process.", key="strategy.name")
        self._owns_group = dist.init_process_group(self.info, backend, self.device, self.cfg.dist.timeout_s,
                                                   local_group=strategy_cls.needs_process_group)
        self._resources.callback(self._leave_group)

        self.train_data, self.eval_data = self._datasets(train_data, eval_data)
        spec = getattr(self.train_data, "spec", None)
        task = getattr(spec, "task", None)
        self.loss_fn = loss_fn if loss_fn is not None or step_fn is not None else default_loss(task)
        self.collate_fn = resolve_collate_fn(collate_fn if collate_fn is not None else self.cfg.data.collate_fn)
        self._sample_cache: List[Any] = []
        if self.loss_fn is None and step_fn is None and not isinstance(self._sample(), Mapping):
            raise ConfigError("No loss function: the training data has no built-in task and its samples are not "
                              "Mappings a model could compute its own loss from (Hugging Face style, with "
                              "'labels'), so pass loss_fn=... to distrain.Trainer (any callable (output, target) -> "
                              "scalar), or step_fn=... .", key="loss_fn")
        if self.plan.global_batch > len(self.train_data):
            raise ConfigError(f"train.global_batch={self.plan.global_batch} is larger than the training set "
                              f"({len(self.train_data)} samples): every step would see some samples twice. Use "
                              f"train.global_batch <= {len(self.train_data)}, or more data.", key="train.global_batch")
        self.sampler = GlobalStepSampler(len(self.train_data), self.plan.global_batch, seed=self.cfg.run.seed)
        self.loader_options = LoaderOptions.resolve(self.cfg.data, self.train_data, self.device,
                                                    self.info.local_world_size, self.plan.grad_accum, self.collate_fn)
        # this rank's micro-batches of any step, from torch's DataLoader; it starts at whatever step comes first
        self.loader = StepLoader(self.train_data, self.sampler, self.info.rank, self.info.world_size,
                                 self.plan.micro_batch, self.cfg.train.steps, self.loader_options, self.device,
                                 seed=self.cfg.run.seed)
        self._eval_loader: Optional[EvalLoader] = None
        self._resources.callback(self._close_loaders)  # DataLoader workers (persistent ones live until close)

        torch.manual_seed(self.cfg.run.seed)  # identical initial weights on every rank, whatever the strategy
        self._setup_notes: List[str] = []  # warnings from before the log exists (it lives in the run directory)
        user_model = prepare_qat(self._model(model, spec, strategy_cls), self.cfg.train)  # train.qat: torchao
        self.throughput = Throughput(self._flops(user_model, spec, builtin=model is None),
                                     peak_flops(self.device, self.cfg.train.precision, self.cfg.metrics.peak_flops),
                                     self.info.world_size)
        self.timer = StepTimer(self.device)
        # The run directory is written only now, once the data and the model are known to build.
        self.run_dir = Path(self.cfg.run.dir) / self.cfg.run.name
        self._prepare_run_dir()
        self.log = setup_logging(self.run_dir, self.info.rank, console=self.cfg.metrics.progress != "none")
        self._resources.callback(close_logging, self.log)
        # a stale lock reclaimed on the way in; a model that could not be built on the meta device
        for note in [*(self._run_lock.notes if self._run_lock else ()), *self._setup_notes]:
            self.log.warning(note)
        ctx = StrategyContext(info=self.info, device=self.device, plan=self.plan, train=self.cfg.train,
                              seed=self.cfg.run.seed)
        self.strategy = build_strategy(self.cfg.strategy.name, ctx, self.cfg.strategy.kwargs)
        self.objective = Objective(user_model, self.device, self.plan.global_batch, loss_fn=self.loss_fn,
                                   step_fn=step_fn, frozen=frozen, items=items, metrics=metrics,
                                   default_items=default_items(spec) if loss_fn is None and step_fn is None else None,
                                   sample=self._sample)
        self._resources.callback(self.strategy.teardown)  # before setup: a half-built engine is released too
        self.strategy.setup(user_model)
        self.compression = Compression(self.cfg.train, self.strategy)  # pruning masks, QAT switch, PowerSGD state
        self.step = 0  # optimizer steps completed
        self._warmup_s: Optional[float] = None  # the compile warm-up step's seconds, until logged
        self._grad_norm: Optional[torch.Tensor] = None
        self.log.info(f"rank {self.info.rank}/{self.info.world_size} ({self.info.source}) on {self.device}, "
                      f"strategy {self.strategy.name}, model built {MODEL_INIT[self.model_init]}, global batch "
                      f"{self.plan.global_batch} = micro {self.plan.micro_batch} x accum {self.plan.grad_accum} x "
                      f"world {self.plan.world_size}; {self.loader_options.describe()}")
        for line in surprises(self.cfg, has_eval_data=self.eval_data is not None):
            self.log.warning(line)
        self.checkpointer = Checkpointer(self.run_dir, self.cfg, self.strategy, self.info, self.sampler,
                                         model_object=None if model is None else user_model, data_spec=spec)
        self._resources.callback(self.checkpointer.close)  # before the engine and the group: an async save needs both
        self.checkpointer.extra_state = self.compression
        self.divergence = DivergenceGuard(self.cfg.train.on_nonfinite, self.strategy, self.device,
                                          self.cfg.train.precision, self.checkpointer.root, self.log)
        self.checkpointer.before_save = self.divergence.settle  # a diverged step stops before any save
        resume_from = self.checkpointer.resolve(self.cfg.train.resume)  # auto | never | PATH, validated
        if resume_from is not None:
            self.step = self.checkpointer.load(resume_from).step
        self._record_config()
        self._resources.callback(self.faults.close)
        self.faults.start(self.log, self.cfg.dist.timeout_s, backend)  # preemption signals, hang watchdog

    # --- setup helpers ---------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Rank 0 owns the run directory (its lock, held until close) before anything is written into it; a second
        run, or a fresh start over an earlier run's checkpoints, is refused on every rank."""
        self._run_lock = claim_run_dir(self.run_dir, self.cfg, self.info)
        if self._run_lock is not None:  # released after everything that writes into the run directory
            self._resources.callback(self._run_lock.release)

    def _record_config(self) -> None:
        """config.yaml of the run, written only once the run is sure to start: a refused resume (another model,
        a changed config) leaves the existing run's record as it was."""
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _datasets(self, train_data: Optional[Dataset], eval_data: Optional[Dataset]):
        if train_data is None:
            return build_datasets(self.cfg.data.name, self.cfg.data.kwargs, self.cfg.data.eval_fraction)
        if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
            raise ConfigError("train_data must be a map-style Dataset (with __getitem__ and __len__); got "
                              f"{type(train_data).__name__}.", key="train_data")
        if len(train_data) == 0:
            raise ConfigError("train_data is empty.", key="train_data")
        return train_data, eval_data

    def _sample(self) -> Any:
        """The first training sample, collated as a batch of one (read once, and only when needed: the kind of
        batches a user's data makes, and a user model's FLOPs)."""
        if not self._sample_cache:
            self._sample_cache.append(fetch_batch(self.train_data, [0], self.collate_fn))
        return self._sample_cache[0]

    def _model(self, model: ModelSource, spec: Any, strategy_cls: type) -> nn.Module:
        """The model to hand the strategy: built on the meta device when the strategy can shard or place it from
        there (model.init, distrain.models.meta_init), else built whole here; a pre-built module as it is.
        Sets ``self.model_init`` to which of the three it was."""
        self.model_init = "object"  # how the model was built: object (passed built) | meta | eager
        if isinstance(model, nn.Module):
            return model  # already materialised; for a model that does not fit, pass a factory instead
        if model is None:
            factory: Callable[[], Any] = functools.partial(build_model, self.cfg.model.name, self.cfg.model.kwargs,
                                                           spec)
        elif callable(model):
            factory = model
        else:
            raise _not_a_model(model)
        built = None
        if self.cfg.model.init == "meta" and not strategy_cls.meta_init:
            raise ConfigError(f"model.init=meta, but strategy.name={self.cfg.strategy.name!r} takes a built model "
                              f"(its class does not set meta_init = True). Use model.init=auto or eager, or a "
                              f"built-in strategy.", key="model.init")
        if strategy_cls.meta_init and self.cfg.model.init != "eager":
            try:
                built = build_on_meta(factory)
                self.model_init = "meta"
            except MetaBuildRefused as why:
                if self.cfg.model.init == "meta":
                    raise ConfigError(f"model.init=meta, but this model cannot be built on the meta device with its "
                                      f"eager initial values: {why}. {META_HINT}", key="model.init") from None
                if self.info.is_main:
                    self._setup_notes.append(f"The model is built whole on every rank, not on the meta device: "
                                             f"{why}. {META_HINT}")
        if built is None:
            built, self.model_init = factory(), "eager"
        if not isinstance(built, nn.Module):
            raise _not_a_model(built)
        return built

    def _flops(self, model: nn.Module, spec: Any, builtin: bool) -> FlopsEstimate:
        """Training FLOPs per sample, for achieved FLOP/s and MFU: a built-in's formula, else torch's counter."""
        if builtin:
            return flops_per_sample(model, spec, builtin=self.cfg.model.name)
        return flops_per_sample(model, spec, sample=forward_sample(model, self._sample()))

    # --- the loop --------------------------------------------------------------------------------------
    def _is_log_step(self, completed: int) -> bool:
        return completed % self._train.log_every == 0 or completed == self._train.steps

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's share of the step's objective (summed over ranks: the loss)."""
        self.strategy.set_lr(lr_at(step, self._train))
        measure = self._is_log_step(step + 1)
        self.timer.begin(measure)  # log steps time their phases: compute vs exposed communication
        with self.timer.phase("data"):
            batches = self._step_batches(step)  # split: my slice of the step's batch, on the device
        loss = self._forward_backward(step, batches)  # train
        with self.timer.phase("update"):
            self._grad_norm = self.strategy.clip_grad_norm(self._train.grad_clip)
            if self._grad_norm is None and measure:  # logged without clipping too, on log steps only
                self._grad_norm = self.strategy.grad_norm()
            if self.divergence.allows_update(step + 1, loss, self._grad_norm):  # a non-finite loss: all ranks agree
                self.strategy.step()  # update: optimizer step on this rank's (shard of the) parameters
            else:
                self.strategy.skip_step()  # train.on_nonfinite=skip_step
        with self.timer.phase("sync"):
            self.strategy.sync(step)  # sync: parameter averaging, for strategies that skip gradient sync
        self.compression.on_step(step + 1)  # pruned weights stay zero; masks and QAT on their schedule
        return loss

    def _step_batches(self, step: int) -> List[Any]:
        """This rank's micro-batches of step ``step``, collated and on the device."""
        return self.loader.micro_batches(step)  # torch's DataLoader: workers, pinned memory, the next step prefetched

    def _forward_backward(self, step: int, batches: List[Any]) -> torch.Tensor:
        """Forward and backward every micro-batch, each as its share of the global-batch mean over valid items.

        The step's items are counted first (all micro-batches, summed over ranks), so every backward divides by
        the same global count: W ranks, any micro_batch and one full batch optimise the same objective.
        """
        counts, total = self.objective.step_counts(batches)
        self.objective.check_items(counts, step, self.info.rank)
        loss: Optional[torch.Tensor] = None
        for i, (batch, items) in enumerate(zip(batches, counts)):
            with self.timer.phase("micro"), self.strategy.accumulate(last_micro_step=i == len(batches) - 1):
                with self.strategy.forward_context():
                    micro = self.objective.micro_loss(self.strategy.model, batch, items, total)
                self.strategy.backward(micro.loss, micro.scale)  # gradient sync rides the last backward
            loss = micro.share if loss is None else loss + micro.share
        return loss

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.steps``; returns the final metrics (identical on every rank)."""
        cfg = self.cfg
        total = cfg.train.steps
        writer = MetricsWriter(self.run_dir, cfg, fresh=self.step == 0) if self.info.is_main else None
        record = RunRecord(self.run_dir) if self.info.is_main else None
        if record:
            record.start(self.info.world_size, vars(self.plan) | {"per_rank": self.plan.per_rank}, self.step)
            self.faults.record_attempt(record, self.step)  # SLURM / torchelastic restart counts of this run
            record.update(perf=self.throughput.describe() | {"memory": memory_kind(self.device)})
            flops, peak = self.throughput.flops, self.throughput.peak
            self.log.info(f"model FLOPs per sample: {f'{flops.per_sample:.4g}' if flops.per_sample else 'unknown'} "
                          f"({flops.method}); MFU: {f'{peak.value:.4g} FLOP/s peak from ' if peak.value else ''}"
                          f"{peak.source}")
        progress = Progress(cfg.metrics.progress if self.info.is_main else "none", total, self.step,
                            description=cfg.run.name)
        final: Dict[str, Any] = {}
        window_start, window_steps = time.perf_counter(), 0
        started = time.perf_counter()
        first_step = self.step
        try:
            while self.step < total:
                self.faults.step_started(self.step)  # the watchdog's "last seen" for this rank
                loss_sum = self.train_step(self.step)
                self.step += 1
                window_steps += 1
                if self.step == first_step + 1:  # after one step: optimizers allocate their state on the first
                    if self._train.compile:  # ...and torch.compile compiles: that step is not a step time or MFU
                        self._warmup_s = time.perf_counter() - window_start
                        window_start, window_steps = time.perf_counter(), 0
                    self._log_memory()
                progress.advance(self.step)
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - window_start
                    final = self._log_step(loss_sum, elapsed / window_steps if window_steps else None, writer,
                                           progress)
                    self.divergence.settle()  # the steps since the last log step: any non-finite? (train.on_nonfinite)
                    window_start, window_steps = time.perf_counter(), 0
                evaluate_now = cfg.train.eval_every and self.step % cfg.train.eval_every == 0
                if self.eval_data is not None and (evaluate_now or self.step == total):
                    scores = self.evaluate()
                    final.update(scores)
                    if writer:
                        writer.write({"step": self.step, **scores})
                    progress.write(f"eval @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                self.checkpointer.maybe_save(self.step)  # checkpoint.every / every_minutes (async if configured)
                if self.step < total and self.faults.should_stop(self.step):  # a preemption signal: all ranks agree
                    break
            self.divergence.settle()  # the last step's non-finite check, before the final save and status
            if self.faults.preempted:
                self.save_checkpoint("preempted")
            elif cfg.checkpoint.at_end:
                self.save_checkpoint("end")
            self.checkpointer.wait()  # an async save still in flight is complete before fit returns
        except BaseException as err:
            failure = self.faults.explain(err, self.step)  # a stuck collective: which one, which step, who is missing
            if record:
                try:
                    record.update(status="failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                                  step=self.step, error=failure or f"{type(err).__name__}: {err}")
                except OSError as record_err:  # e.g. the same full disk: the run's own error is the one to raise
                    self.log.error(f"run.json could not record the failure: {record_err}")
            if failure:
                raise DistributedError(failure) from err
            self.faults.abort_peers(err)
            raise
        finally:
            progress.close()
            if writer:  # the trackers learn how the run ended: an exception in flight means it failed
                writer.close("failed" if sys.exc_info()[0] else "preempted" if self.faults.preempted else "finished")
        final["wall_s"] = time.perf_counter() - started
        if record:
            record.update(status="preempted" if self.faults.preempted else "finished", step=self.step, final=final,
                          nonfinite_steps=self.divergence.nonfinite_steps)
        if self.faults.preempted:
            final["preempted"] = True
            self.faults.after_checkpoint()  # rank 0 under SLURM: requeue; the next run resumes from that checkpoint
        return final

    def _log_step(self, loss_sum: torch.Tensor, step_time: Optional[float], writer: Optional[MetricsWriter],
                  progress: Progress) -> Dict[str, Any]:
        """Reduce the loss over the global batch (all ranks) and write it out (rank 0). ``step_time`` is None
        when the window holds only the compile warm-up step (timed apart, as compile_warmup_s)."""
        loss = dist.all_reduce_sum(loss_sum.detach().clone().double()).item()  # the shares add up to the mean
        samples = self.step * self.plan.global_batch
        record: Dict[str, Any] = {
            "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, self.cfg.train), "samples": samples,
        }
        if self._warmup_s is not None:  # once, in the first record after it
            record["compile_warmup_s"], self._warmup_s = self._warmup_s, None
        spec = getattr(self.train_data, "spec", None)
        if step_time is not None:
            record["step_time_s"], record["samples_per_s"] = step_time, self.plan.global_batch / step_time
            if getattr(spec, "task", None) == "lm":
                record["tokens_per_s"] = record["samples_per_s"] * spec.input_shape[0]
            record.update(self.timer.split(self.info.world_size))
            record.update(self.throughput.record(record["samples_per_s"]))
        if self._grad_norm is not None:
            norm = self._grad_norm
            record["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.strategy.comm_bytes is not None:  # payload this rank sent for sync since it started (DDP, local SGD)
            record["comm_bytes"] = self.strategy.comm_bytes
        memory = self._peak_memory_mb()
        record["peak_mem_mb"], record["peak_mem_mb_ranks"] = max(memory), memory
        if not math.isfinite(loss):
            self.log.warning(f"loss is {loss} at step {self.step}: training has diverged (lower train.lr, or set "
                             f"train.grad_clip)")
        if writer:
            writer.write(record)
        progress.update(self.step, record)
        return {"step": self.step, "loss": loss, "samples": samples}

    def _peak_memory_mb(self) -> List[float]:
        """Every rank's peak memory in MiB (see distrain.telemetry.perf.peak_memory_bytes), gathered with one all-reduce."""
        mine = torch.tensor(peak_memory_bytes(self.device) / 2**20, dtype=torch.float64, device=self.device)
        return [round(v, 1) for v in dist.per_rank(mine)]

    # --- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None) -> Dict[str, float]:
        """Eval loss (the training objective over the whole eval split: summed item losses / items), accuracy when
        the outputs are class logits, and every ``metrics`` hook; sharded over ranks and reduced."""
        dataset = dataset if dataset is not None else self.eval_data
        if dataset is None:
            return {}
        model = self.strategy.model
        was_training = model.training
        model.eval()
        totals: Dict[str, float] = {}
        loader = self._eval_loader_for(dataset)
        for key, batch in loader:  # the same DataLoader settings as training (workers, pinned memory, collate)
            with self.strategy.forward_context():
                sums = self.objective.eval_sums(model, batch)
            if key.padding:  # padding so every rank runs the same number of forwards (FSDP gathers in them)
                continue
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
        if loader is not self._eval_loader:  # a one-off dataset's workers go now
            loader.close()
        model.train(was_training)
        keys = ["loss", "items", "correct", "predicted"] + [f"{kind}:{name}" for name in self.objective.metrics
                                                            for kind in ("metric", "count")]
        reduced = dist.all_reduce_sum(torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64,
                                                   device=self.device)).cpu().tolist()
        totals = dict(zip(keys, reduced))
        scores = {"eval_loss": totals["loss"] / max(totals["items"], 1)}
        if totals["predicted"] > 0:
            scores["eval_accuracy"] = totals["correct"] / totals["predicted"]
        for name in self.objective.metrics:
            scores[f"eval_{name}"] = totals[f"metric:{name}"] / max(totals[f"count:{name}"], 1)
        return scores

    def _eval_loader_for(self, dataset: Dataset) -> EvalLoader:
        """The eval split's loader (kept, with its persistent workers); another dataset gets a one-off loader."""
        if dataset is self.eval_data and self._eval_loader is not None:
            return self._eval_loader
        loader = EvalLoader(dataset, self._eval_batches(len(dataset)), self.loader_options, self.device,
                            seed=self.cfg.run.seed, rank=self.info.rank)
        if dataset is self.eval_data:
            self._eval_loader = loader
        return loader

    def _eval_batches(self, n: int) -> List[BatchKey]:
        """This rank's share of the eval set (``eval_batches``) as the loader's batch keys; padding batches keep
        every rank running as many forwards."""
        batches = eval_batches(n, self.info.rank, self.info.world_size, self.cfg.data.eval_batch)
        return [BatchKey(EVAL_STEP, j, tuple(indices), padding=not weight) for j, (indices, weight) in enumerate(batches)]

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, reason: str = "manual") -> Path:
        """Save a checkpoint of the current step now and return its directory once committed.

        Collective: call it on every rank at the same step (from the loop, e.g. on a preemption signal).
        Saving the same step twice is a no-op that returns the existing checkpoint.
        """
        return self.checkpointer.save(self.step, reason=reason, blocking=True)

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Load model, optimizer and trainer state from a checkpoint (or a run's newest valid one), on every rank;
        training continues at its step, on exactly the next samples, at any world size."""
        self.step = self.checkpointer.load(self.checkpointer.resolve_path(Path(path))).step

    # --- results ---------------------------------------------------------------------------------------
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The consolidated full weights on CPU; complete on rank 0 whatever the strategy (call on all ranks)."""
        return self.strategy.full_state_dict()

    def memory_report(self) -> Dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds."""
        return self.strategy.memory_report()

    def _log_memory(self) -> None:
        report = ", ".join(f"{kind} {size / 2**20:.2f} MiB" for kind, size in self.memory_report().items())
        self.log.info(f"rank {self.info.rank} holds {report} ({self.strategy.name})")

    def close(self, failed: bool = False) -> None:
        """Release what this Trainer acquired, newest first: the fault handlers, the checkpointer (an async save in
        flight finishes first), the strategy's engine, the log file and, if this Trainer created it, the process
        group (no barrier after a failure: a peer may be gone)."""
        self._clean_exit = not failed
        self._resources.close()

    def _close_loaders(self) -> None:
        self.loader.close()
        if self._eval_loader is not None:
            self._eval_loader.close()

    def _leave_group(self) -> None:
        if not self._owns_group:
            return
        if self._clean_exit:
            dist.barrier()  # no rank tears the group down while a peer is still talking to it
        # gloo's worker thread frees the last collective's work object (the barrier's; after a failure, e.g. the
        # resume decision's broadcast) just after waking us, and needs the GIL for it; if we dropped the group (its
        # destructor joins that thread, holding the GIL) in that window, both would wait forever. Seen about once
        # in 12 runs on a loaded machine; a short GIL-free sleep lets the worker finish first.
        time.sleep(0.2)
        dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)


def eval_batches(n: int, rank: int, world_size: int, batch_size: int) -> List[tuple]:
    """Rank ``rank``'s contiguous share of an eval set of ``n`` samples as (indices, weight) batches of at most
    ``batch_size``, padded with weight-0 batches so every rank runs as many forwards (FSDP gathers in them)."""
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    batches = [(mine[i:i + batch_size], 1) for i in range(0, len(mine), batch_size)]
    needed = math.ceil(per_rank / batch_size)
    return batches + [([0], 0)] * (needed - len(batches))
