"""The loop: split -> train -> update -> sync. It knows nothing of DDP vs FSDP vs DeepSpeed: a strategy does.

``Trainer`` takes a config (path, dict or Config) and, optionally, the user's own model (or a zero-argument
factory), map-style Datasets and loss callable. It runs in a single process and under torchrun/SLURM alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from distrain import dist
from distrain.config import ConfigSource, batch_plan, load_config, to_yaml
from distrain.data import GlobalStepSampler, build_datasets, fetch_batch, move_to, split_input_target
from distrain.env import detect
from distrain.errors import ConfigError
from distrain.logs import get_logger, setup_logging
from distrain.losses import LossFn, correct_and_count, default_loss
from distrain.metrics import MetricsWriter, Progress
from distrain.models import build_model
from distrain.optim import lr_at
from distrain.runinfo import RunRecord
from distrain.strategies import StrategyContext, build_strategy, strategy_class

ModelSource = Union[nn.Module, Callable[[], nn.Module], None]


class Trainer:
    def __init__(self, config: ConfigSource = None, *, model: ModelSource = None, train_data: Optional[Dataset] = None,
                 loss_fn: Optional[LossFn] = None, eval_data: Optional[Dataset] = None,
                 overrides: Sequence[str] = ()):
        self.cfg: DictConfig = load_config(config, overrides)
        self.info = detect()
        self.plan = batch_plan(self.cfg, self.info.world_size)
        strategy_cls = strategy_class(self.cfg.strategy.name)
        self.device = dist.resolve_device(self.cfg.dist.device, self.info)
        backend = dist.resolve_backend(self.cfg.dist.backend, self.device)
        if self.info.distributed and not strategy_cls.needs_process_group:
            raise ConfigError(f"strategy.name={self.cfg.strategy.name!r} runs a single process, but this job has "
                              f"world_size={self.info.world_size}. Use strategy.name=ddp (or another distributed "
                              f"strategy), or launch one process.", key="strategy.name")
        self._owns_group = dist.init_process_group(self.info, backend, self.device, self.cfg.dist.timeout_s,
                                                   local_group=strategy_cls.needs_process_group)
        self.run_dir = Path(self.cfg.run.dir) / self.cfg.run.name
        self._prepare_run_dir()
        self.log = setup_logging(self.run_dir, self.info.rank, console=self.cfg.metrics.progress != "none")

        self.train_data, self.eval_data = self._datasets(train_data, eval_data)
        spec = getattr(self.train_data, "spec", None)
        self.loss_fn = loss_fn or default_loss(getattr(spec, "task", None))
        if self.loss_fn is None:
            raise ConfigError("No loss function: the training data has no built-in task, so pass "
                              "loss_fn=... to distrain.Trainer (any callable (output, target) -> scalar).",
                              key="loss_fn")
        self.sampler = GlobalStepSampler(len(self.train_data), self.plan.global_batch, seed=self.cfg.run.seed)

        torch.manual_seed(self.cfg.run.seed)  # identical initial weights on every rank, whatever the strategy
        user_model = self._model(model, spec)
        ctx = StrategyContext(info=self.info, device=self.device, plan=self.plan, train=self.cfg.train,
                              seed=self.cfg.run.seed)
        self.strategy = build_strategy(self.cfg.strategy.name, ctx, self.cfg.strategy.kwargs)
        self.strategy.setup(user_model)
        self.step = 0  # optimizer steps completed
        self._grad_norm: Optional[torch.Tensor] = None
        self.log.info(f"rank {self.info.rank}/{self.info.world_size} ({self.info.source}) on {self.device}, "
                      f"strategy {self.strategy.name}, global batch {self.plan.global_batch} = micro "
                      f"{self.plan.micro_batch} x accum {self.plan.grad_accum} x world {self.plan.world_size}")

    # --- setup helpers ---------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        if self.info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            except OSError as err:
                raise ConfigError(f"Run directory '{self.run_dir}' (run.dir/run.name) cannot be written: "
                                  f"{err.strerror}. Choose a writable run.dir.", key="run.dir") from None
        dist.barrier()

    def _datasets(self, train_data: Optional[Dataset], eval_data: Optional[Dataset]):
        if train_data is None:
            return build_datasets(self.cfg.data.name, self.cfg.data.kwargs, self.cfg.data.eval_fraction)
        if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
            raise ConfigError("train_data must be a map-style Dataset (with __getitem__ and __len__); got "
                              f"{type(train_data).__name__}.", key="train_data")
        if len(train_data) == 0:
            raise ConfigError("train_data is empty.", key="train_data")
        return train_data, eval_data

    def _model(self, model: ModelSource, spec: Any) -> nn.Module:
        if model is None:
            return build_model(self.cfg.model.name, self.cfg.model.kwargs, spec)
        if isinstance(model, nn.Module):
            return model
        if callable(model):
            built = model()
            if isinstance(built, nn.Module):
                return built
        raise ConfigError(f"model must be an nn.Module or a zero-argument function returning one; got "
                          f"{type(model).__name__}.", key="model")

    # --- the loop --------------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's summed micro-batch losses (not yet reduced)."""
        micro_batches = self.sampler.micro_batches(step, self.info.rank, self.info.world_size,
                                                   self.plan.micro_batch)  # split: my slice of step's batch
        self.strategy.set_lr(lr_at(step, self.cfg.train))
        loss_sum = torch.zeros((), device=self.device)
        for i, indices in enumerate(micro_batches):  # train: forward/backward per micro-batch
            inputs, targets = move_to(split_input_target(fetch_batch(self.train_data, indices)), self.device)
            with self.strategy.accumulate(last_micro_step=i == len(micro_batches) - 1):
                with self.strategy.forward_context():
                    loss = self.loss_fn(self.strategy.model(inputs), targets)
                self.strategy.backward(loss)  # gradient sync (all-reduce/reduce-scatter) rides the last backward
            loss_sum += loss.detach()
        self._grad_norm = self.strategy.clip_grad_norm(self.cfg.train.grad_clip)
        self.strategy.step()  # update: optimizer step on this rank's (shard of the) parameters
        self.strategy.sync(step)  # sync: parameter averaging, for strategies that skip gradient sync
        return loss_sum

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.steps``; returns the final metrics (identical on every rank)."""
        cfg = self.cfg
        total = cfg.train.steps
        writer = MetricsWriter(self.run_dir, cfg.metrics.tensorboard, fresh=self.step == 0) if self.info.is_main else None
        record = RunRecord(self.run_dir) if self.info.is_main else None
        if record:
            record.start(self.info.world_size, vars(self.plan) | {"per_rank": self.plan.per_rank}, self.step)
        progress = Progress(cfg.metrics.progress if self.info.is_main else "none", total, self.step,
                            description=cfg.run.name)
        final: Dict[str, Any] = {}
        window_start, window_steps = time.perf_counter(), 0
        started = time.perf_counter()
        try:
            while self.step < total:
                loss_sum = self.train_step(self.step)
                self.step += 1
                window_steps += 1
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - window_start
                    final = self._log_step(loss_sum, elapsed / window_steps, writer, progress)
                    window_start, window_steps = time.perf_counter(), 0
                evaluate_now = cfg.train.eval_every and self.step % cfg.train.eval_every == 0
                if self.eval_data is not None and (evaluate_now or self.step == total):
                    scores = self.evaluate()
                    final.update(scores)
                    if writer:
                        writer.write({"step": self.step, **scores})
                    progress.write(f"eval @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        except BaseException as err:
            if record:
                record.update(status="failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                              step=self.step, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            progress.close()
            if writer:
                writer.close()
        final["wall_s"] = time.perf_counter() - started
        if record:
            record.update(status="finished", step=self.step, final=final)
        return final

    def _log_step(self, loss_sum: torch.Tensor, step_time: float, writer: Optional[MetricsWriter],
                  progress: Progress) -> Dict[str, Any]:
        """Reduce the loss over the global batch (all ranks) and write it out (rank 0)."""
        loss = dist.all_reduce_sum(loss_sum.detach().clone()).item() / (self.plan.grad_accum * self.info.world_size)
        samples = self.step * self.plan.global_batch
        record: Dict[str, Any] = {
            "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, self.cfg.train), "samples": samples,
            "step_time_s": step_time, "samples_per_s": self.plan.global_batch / step_time,
        }
        spec = getattr(self.train_data, "spec", None)
        if getattr(spec, "task", None) == "lm":
            record["tokens_per_s"] = record["samples_per_s"] * spec.input_shape[0]
        if self._grad_norm is not None:
            record["grad_norm"] = float(self._grad_norm)
        if not math.isfinite(loss):
            self.log.warning(f"loss is {loss} at step {self.step}: training has diverged (lower train.lr, or set "
                             f"train.grad_clip)")
        if writer:
            writer.write(record)
        progress.update(self.step, record)
        return {"step": self.step, "loss": loss, "samples": samples}

    # --- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None) -> Dict[str, float]:
        """Mean loss (and accuracy for classifiers) over the eval split, sharded over ranks and reduced."""
        dataset = dataset if dataset is not None else self.eval_data
        if dataset is None:
            return {}
        model = self.strategy.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss*n, n, correct, counted
        for indices, weight in self._eval_batches(len(dataset)):
            inputs, targets = move_to(split_input_target(fetch_batch(dataset, indices)), self.device)
            with self.strategy.forward_context():
                outputs = model(inputs)
            if not weight:  # padding so every rank runs the same number of forwards (FSDP gathers in them)
                continue
            totals[0] += float(self.loss_fn(outputs, targets)) * len(indices)
            totals[1] += len(indices)
            hits = correct_and_count(outputs, targets)
            if hits is not None:
                totals[2] += hits[0]
                totals[3] += hits[1]
        model.train(was_training)
        totals = dist.all_reduce_sum(totals.to(self.device)).cpu()
        scores = {"eval_loss": float(totals[0] / max(totals[1], 1))}
        if totals[3] > 0:
            scores["eval_accuracy"] = float(totals[2] / totals[3])
        return scores

    def _eval_batches(self, n: int) -> List[tuple]:
        """This rank's contiguous share of the eval set in batches, padded so all ranks run as many batches."""
        per_rank = math.ceil(n / self.info.world_size)
        mine = list(range(self.info.rank * per_rank, min(n, (self.info.rank + 1) * per_rank)))
        size = self.cfg.data.eval_batch
        batches = [(mine[i:i + size], 1) for i in range(0, len(mine), size)]
        needed = math.ceil(per_rank / size)
        return batches + [([0], 0)] * (needed - len(batches))

    # --- results ---------------------------------------------------------------------------------------
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The consolidated full weights on CPU; complete on rank 0 whatever the strategy (call on all ranks)."""
        return self.strategy.full_state_dict()

    def memory_report(self) -> Dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds."""
        return self.strategy.memory_report()

    def close(self) -> None:
        """Release the strategy and, if this Trainer created it, the process group."""
        self.strategy.teardown()
        if self._owns_group:
            dist.barrier()  # no rank tears the group down while a peer is still talking to it
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
