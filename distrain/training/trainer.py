"""The loop: split -> train -> update -> sync. It knows nothing of DDP vs FSDP vs DeepSpeed: a strategy does.

``Trainer`` takes a config (path, dict or Config) and, optionally, the user's own model (or a zero-argument
factory), map-style Datasets and loss callable. It runs in a single process and under torchrun/SLURM alike.

Its shape: set-up steps (``_set_up``: join the group, build data, model, run directory, strategy, checkpointing,
start fault handling), the loop (``fit``, ``train_step``), the finish (``_save_at_end``, ``_finish``) and ``close``
(released newest first, the process group last: ``_leave_group``). Each concern's own module does the work.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from distrain import dist
from distrain.checkpoint import Checkpointer
from distrain.checkpoint.paths import checkpoints_root, latest_checkpoint
from distrain.compression.qat import prepare_qat
from distrain.compression.state import Compression
from distrain.config import ConfigSource, TrainConfig, batch_plan, load_config, surprises, to_yaml
from distrain.data import GlobalStepSampler, LoaderOptions, StepLoader, fetch_batch, resolve_collate_fn
from distrain.data.datasets import training_datasets
from distrain.data.collate import CollateFn
from distrain.data.fingerprint import fingerprint_data
from distrain.env import detect
from distrain.errors import ConfigError, DistributedError
from distrain.faults import FaultTolerance
from distrain.models.source import MODEL_INIT, ModelSource, build_user_model
from distrain.strategies import StrategyContext, build_strategy, strategy_class
from distrain.telemetry.flops import flops_per_sample, peak_flops
from distrain.telemetry.logs import close_logging, setup_logging
from distrain.telemetry.perf import Throughput, describe_holdings
from distrain.telemetry.profiling import label
from distrain.telemetry.metrics import MetricsWriter
from distrain.telemetry.run_report import RunReport
from distrain.telemetry.step_record import StepRecorder, StepWindow
from distrain.training.divergence import DivergenceGuard
from distrain.training.evaluation import Evaluator
from distrain.training.lifetime import close_at_exit
from distrain.training.losses import LossFn, default_items, resolve_loss
from distrain.training.micro_steps import MicroSteps
from distrain.training.objective import ItemsRule, MetricFn, Objective, forward_sample
from distrain.optim import lr_at
from distrain.training.run_dir import claim_run_dir, finished_note


class Trainer:
    def __init__(self, config: ConfigSource = None, *, model: ModelSource = None, train_data: Optional[Dataset] = None,
                 loss_fn: Optional[LossFn] = None, eval_data: Optional[Dataset] = None, overrides: Sequence[str] = (),
                 collate_fn: Optional[CollateFn] = None, step_fn: Optional[Callable[..., Any]] = None,
                 frozen: Optional[Mapping[str, nn.Module]] = None, items: Optional[ItemsRule] = None,
                 metrics: Optional[Mapping[str, MetricFn]] = None, device: Optional[torch.device] = None):
        """``loss_fn(outputs, target[, num_items_in_batch])``, or none for a model that returns its own ``loss``
        (Mapping batches, ``model(**batch)``), or ``step_fn(model, batch, **frozen[, num_items_in_batch])`` for any
        other computation, with ``frozen`` modules (a teacher) that are never trained. ``items``: what the loss
        averages over ('samples', 'labels' that are not -100, or batch -> count); ``metrics``: name ->
        (outputs, batch) -> (sum, count), reported by ``evaluate`` as eval_<name> = sum / count over the eval set.
        ``collate_fn``: how a micro-batch's samples become one batch (else data.collate_fn, else torch's default).
        ``device``: an integration's own device (Ray Train); else dist.device decides.
        See distrain.training.objective."""
        # What it acquires (group, run-dir lock, log, loaders, engine, checkpoint group, threads) registers its
        # release here as it is acquired; close() releases them newest first, and so does a failing __init__.
        self._resources = contextlib.ExitStack()
        self._clean_exit = False  # set by close(): only a clean exit waits for the peers before leaving the group
        close_at_exit(self)  # a script that never calls close() still exits (distrain.training.lifetime)
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
        # train.* as one typed object read everywhere below: a DictConfig attribute read costs ~10 us and lr_at
        # ~100 us (OmegaConf validates on every access), which on a small model is several percent of the step.
        self.settings: TrainConfig = OmegaConf.to_object(self.cfg.train)
        strategy_cls = self._join_group(device)
        spec = self._build_data(train_data, eval_data, loss_fn, step_fn, collate_fn)
        built = self._build_model(model, spec, strategy_cls)
        self._open_run_dir(built.notes)
        self._build_strategy(built.module, spec, step_fn=step_fn, frozen=frozen, items=items, metrics=metrics,
                             default_loss=loss_fn is None and step_fn is None)
        self._build_checkpointing(model_object=None if model is None else built.module, spec=spec)
        self._start_fault_handling()

    # --- set-up steps ----------------------------------------------------------------------------------
    def _join_group(self, device: Optional[torch.device]) -> type:
        """Who this process is, its device and the process group (made if the strategy class, returned, needs one)."""
        self.info = detect()
        self.faults = FaultTolerance(self.cfg.faults, self.info)  # before the process group: flight recorder on
        self.plan = batch_plan(self.cfg, self.info.world_size)
        strategy_cls = strategy_class(self.cfg.strategy.name)
        self.device = dist.device_of_run(self.cfg.dist, self.info, device)
        self._backend = dist.resolve_backend(self.cfg.dist.backend, self.device)
        if self.info.distributed and not strategy_cls.needs_process_group:
            raise ConfigError(f"strategy.name={self.cfg.strategy.name!r} runs a single process, but this job has "
                              f"world_size={self.info.world_size}. Use strategy.name=ddp (or another distributed "
                              f"strategy), or launch one process.", key="strategy.name")
        self._owns_group = dist.init_process_group(self.info, self._backend, self.device, self.cfg.dist.timeout_s,
                                                   local_group=strategy_cls.needs_process_group)
        self._resources.callback(self._leave_group)
        self._writer: Optional[MetricsWriter] = None  # rank 0's, once fit runs: its trackers flush in _leave_group
        return strategy_cls

    def _build_data(self, train_data: Optional[Dataset], eval_data: Optional[Dataset], loss_fn: Optional[LossFn],
                    step_fn: Optional[Callable[..., Any]], collate_fn: Optional[CollateFn]) -> Any:
        """The datasets, the loss, the sampler and this rank's step loader; returns a built-in dataset's DataSpec."""
        self.train_data, self.eval_data = training_datasets(self.cfg.data, train_data, eval_data)
        spec = getattr(self.train_data, "spec", None)
        self.collate_fn = resolve_collate_fn(collate_fn if collate_fn is not None else self.cfg.data.collate_fn)
        # the first sample as a batch of one, read once when needed (the kind of batches; a user model's FLOPs)
        self._sample = functools.cache(lambda: fetch_batch(self.train_data, [0], self.collate_fn))
        self.loss_fn = resolve_loss(loss_fn, step_fn, getattr(spec, "task", None), self._sample)
        if self.plan.global_batch > len(self.train_data):
            raise ConfigError(f"train.global_batch={self.plan.global_batch} is larger than the training set "
                              f"({len(self.train_data)} samples): every step would see some samples twice. Use "
                              f"train.global_batch <= {len(self.train_data)}, or more data.", key="train.global_batch")
        self.sampler = GlobalStepSampler(len(self.train_data), self.plan.global_batch, seed=self.cfg.run.seed)
        self.loader_options = LoaderOptions.resolve(self.cfg.data, self.train_data, self.device,
                                                    self.info.local_world_size, self.plan.grad_accum, self.collate_fn)
        # this rank's micro-batches of any step, from torch's DataLoader; it starts at whatever step comes first
        self.loader = StepLoader(self.train_data, self.sampler, self.info.rank, self.info.world_size,
                                 self.plan.micro_batch, self.settings.steps, self.loader_options, self.device,
                                 seed=self.cfg.run.seed)
        self.evaluator: Optional[Evaluator] = None  # with the objective, once the strategy is built
        self._resources.callback(self._close_loaders)  # DataLoader workers (persistent ones live until close)
        return spec

    def _build_model(self, model: ModelSource, spec: Any, strategy_cls: type) -> Any:
        """The model (distrain.models.source), its FLOPs per sample, and the log steps' recorder."""
        torch.manual_seed(self.cfg.run.seed)  # identical initial weights on every rank, whatever the strategy
        built = build_user_model(model, self.cfg, spec, meta_capable=strategy_cls.meta_init,
                                 explain=self.info.is_main)
        built.module = prepare_qat(built.module, self.cfg.train)  # train.qat: fake-quantized int8 weights (torchao)
        self.model_init = built.init
        flops = (flops_per_sample(built.module, spec, builtin=self.cfg.model.name) if model is None  # its formula
                 else flops_per_sample(built.module, spec, sample=forward_sample(built.module, self._sample())))
        self.throughput = Throughput(flops, peak_flops(self.device, self.settings.precision,
                                                       self.cfg.metrics.peak_flops), self.info.world_size)
        self.recorder = StepRecorder(self.device, self.plan.global_batch, self.info.world_size, self.throughput, spec,
                                     stragglers=self.cfg.metrics)  # metrics.straggler_*: which rank lags
        self.timer = self.recorder.timer  # train_step times its phases on log steps
        return built

    def _open_run_dir(self, notes: List[str]) -> None:
        """The run directory and its log, written only now that data and model build. Rank 0 owns it (its lock, held
        until close) first; a second run, or a fresh start over an earlier run's checkpoints, is refused on all ranks."""
        self.run_dir = Path(self.cfg.run.dir) / self.cfg.run.name
        self._run_lock = claim_run_dir(self.run_dir, self.cfg, self.info)
        if self._run_lock is not None:  # released after everything that writes into the run directory
            self._resources.callback(self._run_lock.release)
        self.log = setup_logging(self.run_dir, self.info.rank, console=self.cfg.metrics.progress != "none")
        self._resources.callback(close_logging, self.log)
        # a stale lock reclaimed on the way in; a model that could not be built on the meta device
        for note in [*(self._run_lock.notes if self._run_lock else ()), *notes]:
            self.log.warning(note)

    def _build_strategy(self, module: nn.Module, spec: Any, *, step_fn: Optional[Callable[..., Any]],
                        frozen: Optional[Mapping[str, nn.Module]], items: Optional[ItemsRule],
                        metrics: Optional[Mapping[str, MetricFn]], default_loss: bool) -> None:
        """The strategy wraps or shards the model and builds the optimizer; the objective and the evaluator."""
        ctx = StrategyContext(info=self.info, device=self.device, plan=self.plan, train=self.cfg.train,
                              seed=self.cfg.run.seed)
        self.strategy = build_strategy(self.cfg.strategy.name, ctx, self.cfg.strategy.kwargs)
        self.objective = Objective(module, self.device, self.plan.global_batch, loss_fn=self.loss_fn,
                                   step_fn=step_fn, frozen=frozen, items=items, metrics=metrics,
                                   default_items=default_items(spec) if default_loss else None, sample=self._sample)
        self.micro_steps = MicroSteps(self.strategy, self.objective, self.loader, self.timer, self.log,
                                      snapshots=self.run_dir / "memory" if self.cfg.metrics.memory_snapshot else None)
        self._resources.callback(self.strategy.teardown)  # before setup: a half-built engine is released too
        self.strategy.setup(module)
        self.compression = Compression(self.cfg.train, self.strategy)  # pruning masks, QAT switch, PowerSGD state
        self.evaluator = Evaluator(self.objective, self.strategy, self.eval_data, self.loader_options, self.info,
                                   seed=self.cfg.run.seed, batch_size=self.cfg.data.eval_batch)
        self.step = 0  # optimizer steps completed
        self._grad_norm: Optional[torch.Tensor] = None
        self.log.info(f"rank {self.info.rank}/{self.info.world_size} ({self.info.source}) on {self.device}, "
                      f"strategy {self.strategy.name}, model built {MODEL_INIT[self.model_init]}, global batch "
                      f"{self.plan.global_batch} = micro {self.plan.micro_batch} x accum {self.plan.grad_accum} x "
                      f"world {self.plan.world_size}; {self.loader_options.describe()}")
        for line in surprises(self.cfg, has_eval_data=self.eval_data is not None):
            self.log.warning(line)

    def _build_checkpointing(self, model_object: Optional[nn.Module], spec: Any) -> None:
        """The divergence guard (train.on_nonfinite), the checkpointer it guards, and the resume."""
        self.divergence = DivergenceGuard(self.settings.on_nonfinite, self.strategy, self.device,
                                          self.settings.precision, checkpoints_root(self.run_dir), self.log,
                                          before_settle=self.objective.settle_items)  # 0/0 micro-batches first
        self.checkpointer = Checkpointer(self.run_dir, self.cfg, self.strategy, self.info, self.sampler,
                                         before_save=self.divergence.check_before_save,  # nothing diverged is saved
                                         model_object=model_object, data_spec=spec,
                                         data_fingerprint=fingerprint_data(self.train_data, self.eval_data, self.log),
                                         extra_state=self.compression)  # pruning masks, PowerSGD state per rank
        self._resources.callback(self.checkpointer.close)  # before the engine and the group: an async save needs both
        resume_from = self.checkpointer.resolve(self.settings.resume)  # auto | never | PATH, validated
        if resume_from is not None:
            state = self.checkpointer.load(resume_from)
            self.step = state.step
            self.micro_steps.resume(state.micro_batch, state.world_size)  # micro_batch=auto: the size found
            note = finished_note(self.cfg, self.step) if self.info.is_main else None
            if note:  # a finished run started again
                self.log.warning(note)
        if self.info.is_main:  # config.yaml only once the run is sure to start: a refused resume leaves it as it was
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _start_fault_handling(self) -> None:
        self._resources.callback(self.faults.close)
        self.faults.start(self.log, self.cfg.dist.timeout_s, self._backend)  # preemption signals, hang watchdog

    # --- the loop --------------------------------------------------------------------------------------
    def _is_log_step(self, completed: int) -> bool:
        return completed % self.settings.log_every == 0 or completed == self.settings.steps

    def _is_eval_step(self, completed: int) -> bool:
        every, last = self.settings.eval_every, completed == self.settings.steps
        return self.eval_data is not None and (last or bool(every) and completed % every == 0)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's share of the step's objective (summed over ranks: the loss)."""
        self.strategy.set_lr(lr_at(step, self.settings))
        measure = self._is_log_step(step + 1)
        self.timer.begin(measure)  # log steps time their phases: compute vs exposed communication
        with self.timer.phase("data"), label("split"):
            # split: my slice of the step's batch, collated and on the device (torch's DataLoader: workers, pinned
            # memory, the next step prefetched)
            batches = self.loader.micro_batches(step)
        loss = self._forward_backward(step, batches)  # train
        with self.timer.phase("update"), label("optimizer"):
            self.compression.before_update()  # QAT under ddp/zero1: the gradients' float64 sum over ranks
            self._grad_norm = self.strategy.clip_grad_norm(self.settings.grad_clip)
            if self._grad_norm is None and measure:  # logged without clipping too, on log steps only
                self._grad_norm = self.strategy.grad_norm()
            if self.divergence.allows_update(step + 1, loss, self._grad_norm):  # a non-finite loss: all ranks agree
                self.strategy.step()  # update: optimizer step on this rank's (shard of the) parameters
            else:
                self.strategy.skip_step()  # train.on_nonfinite=skip_step
        with self.timer.phase("sync"), label("sync"):
            self.strategy.sync(step)  # sync: parameter averaging, for strategies that skip gradient sync
        self.compression.on_step(step + 1)  # pruned weights stay zero; masks and QAT on their schedule
        return loss

    def _forward_backward(self, step: int, batches: List[Any]) -> torch.Tensor:
        """Every micro-batch's forward and backward; micro_batch=auto redoes an OOM step smaller (micro_steps)."""
        return self.micro_steps.run(step, batches)

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.steps``; returns the final metrics (identical on every rank)."""
        report = RunReport(self.run_dir, self.cfg, self.info, self.plan, self.step, self.throughput, self.device,
                           self.log, record_attempt=self.faults.record_attempt)  # run.json, metrics, progress
        self._writer = report.writer
        started = time.perf_counter()
        self.faults.training(True)  # stop signals stop at a step boundary, until fit ends
        try:
            final = self._loop(report)
            self._save_at_end()
        except BaseException as err:
            failure = self.faults.explain(err, self.step)  # a stuck collective: which one, which step, who is missing
            report.failed(err, self.step, failure)
            if failure:
                raise DistributedError(failure) from err
            self.faults.abort_peers(err)
            raise
        finally:  # stop signals end the process again; the trackers learn how the run ended (an exception: failed)
            self.faults.training(False)
            report.close("failed" if sys.exc_info()[0] else "preempted" if self.faults.preempted else "finished",
                         latest_checkpoint(self.run_dir))
        final["wall_s"] = time.perf_counter() - started
        return self._finish(report, final)

    def _loop(self, report: RunReport) -> Dict[str, Any]:
        """Steps until ``train.steps`` or a preemption signal: each one split, train, update, sync (``train_step``),
        then what is due after it: a log record, an evaluation, a checkpoint."""
        final: Dict[str, Any] = {}
        window, first_step = StepWindow(warmup=self.settings.compile), self.step
        while self.step < self.settings.steps:
            self.faults.step_started(self.step)  # the watchdog's "last seen" for this rank
            loss_sum = self.train_step(self.step)  # split, train, update, sync
            self.step += 1
            report.plan_used(self.step, self.micro_steps.plan)  # micro_batch=auto: a new size, once
            window.step_done()
            if self.step == first_step + 1:  # the optimizer state now exists
                self.log.info(describe_holdings(self.info.rank, self.memory_report(), self.strategy.name))
            report.advance(self.step)
            if self._is_log_step(self.step):
                final = self._log_step(loss_sum, window, report)
            if self._is_eval_step(self.step):
                scores = self.evaluate()
                final.update(scores)
                report.evaluated(self.step, scores)
            self.checkpointer.maybe_save(self.step)  # checkpoint.every / every_minutes (async if configured)
            if self.faults.should_stop(self.step, last=self.step >= self.settings.steps):  # a preemption: all agree
                break
        return final

    def _log_step(self, loss_sum: torch.Tensor, window: StepWindow, report: RunReport) -> Dict[str, Any]:
        """Collective: the step's record (loss reduced over the global batch; distrain.telemetry.step_record),
        written out on rank 0; then the steps since the last log step are checked for non-finite values."""
        grad_norm = None if self._grad_norm is None else self.strategy.scalar(self._grad_norm)
        record = self.recorder.build(self.step, loss_sum, lr_at(self.step - 1, self.settings), window, grad_norm,
                                     self.strategy.comm_bytes)
        report.logged(self.step, record)
        self.divergence.settle()  # the steps since the last log step: any non-finite? (train.on_nonfinite)
        window.restart()
        return {"step": self.step, "loss": record["loss"], "samples": record["samples"]}

    # --- finish ----------------------------------------------------------------------------------------
    def _save_at_end(self) -> None:
        """The last step's non-finite check, then the final checkpoint (preempted, or train's end), complete
        before fit returns (an async save still in flight is waited for)."""
        self.divergence.settle()
        if self.faults.preempted:
            self.save_checkpoint("preempted")
        elif self.cfg.checkpoint.at_end:
            self.save_checkpoint("end")
        self.checkpointer.wait()

    def _finish(self, report: RunReport, final: Dict[str, Any]) -> Dict[str, Any]:
        report.finished(self.faults.preempted, self.step, final, self.divergence.nonfinite_steps)
        if self.faults.preempted:
            final["preempted"] = True
            self.faults.after_checkpoint()  # rank 0 under SLURM: requeue; the next run resumes from that checkpoint
        return final

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, dataset: Optional[Dataset] = None) -> Dict[str, float]:
        """Eval loss (the training objective over the whole eval split: summed item losses / items), accuracy when
        the outputs are class logits, and every ``metrics`` hook; sharded over ranks and reduced
        (distrain.training.evaluation). Collective."""
        return self.evaluator.evaluate(dataset)

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
        state = self.checkpointer.load(self.checkpointer.resolve_path(Path(path)))
        self.step = state.step
        self.micro_steps.resume(state.micro_batch, state.world_size)

    # --- results ---------------------------------------------------------------------------------------
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The consolidated full weights on CPU; complete on rank 0 whatever the strategy (call on all ranks)."""
        return self.strategy.full_state_dict()

    def memory_report(self) -> Dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds."""
        return self.strategy.memory_report()

    # --- close -----------------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Release what this Trainer acquired, newest first: the fault handlers, the checkpointer (an async save in
        flight finishes first), the strategy's engine, the log file and, if this Trainer created it, the process
        group (no barrier after a failure: a peer may be gone)."""
        self._clean_exit = not failed
        self._resources.close()

    def _close_loaders(self) -> None:
        self.loader.close()
        if self.evaluator is not None:
            self.evaluator.close()

    def _leave_group(self) -> None:
        if self._owns_group:
            dist.leave_process_group(wait_for_peers=self._clean_exit)
            self._owns_group = False
        if self._writer is not None:  # after the last collective: no peer waits while the trackers flush (bounded)
            self._writer.wait()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)
