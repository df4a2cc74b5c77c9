"""What one ``Trainer.fit`` reports besides checkpoints, from its start to its end: run.json's status (RunRecord),
metrics.jsonl and the trackers (MetricsWriter), and the console progress. Rank 0 writes; other ranks hold nothing
and every method is a no-op there, except the profiler traces (metrics.profile), which every selected rank writes."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from distrain.config import BatchPlan
from distrain.env import ProcessInfo
from distrain.telemetry.metrics import MetricsWriter
from distrain.telemetry.perf import Throughput, memory_kind
from distrain.telemetry.profiling import build_profiler
from distrain.telemetry.progress import Progress
from distrain.telemetry.run_record import RunRecord


class RunReport:
    """Opens the run's reports at the start of ``fit`` (status "running", the plan, the FLOPs estimate) and closes
    them with how it ended: finished, preempted, failed or interrupted."""

    def __init__(self, run_dir: Path, cfg: DictConfig, info: ProcessInfo, plan: BatchPlan, start_step: int,
                 throughput: Throughput, device: torch.device, log: logging.Logger,
                 record_attempt: Callable[[Optional[RunRecord], int], None]):
        """``record_attempt(record, start_step)``: adds this attempt of the job (restart counts) to run.json."""
        self.log, self.plan = log, plan
        main = info.is_main
        self.writer = MetricsWriter(run_dir, cfg, fresh=start_step == 0, start_step=start_step) if main else None
        # A finished run started again trains nothing: run.json keeps the finished run's record (status, start,
        # final loss, wall time) instead of an empty attempt's.
        idle = start_step >= int(cfg.train.steps)
        self.record = RunRecord(run_dir) if main and not idle else None
        if self.record:
            self.record.start(info.world_size, vars(plan) | {"per_rank": plan.per_rank}, start_step)
            record_attempt(self.record, start_step)  # SLURM / torchelastic restart counts of this run
            self.record.update(perf=throughput.describe() | {"memory": memory_kind(device)})
            flops, peak = throughput.flops, throughput.peak
            log.info(f"model FLOPs per sample: {f'{flops.per_sample:.4g}' if flops.per_sample else 'unknown'} "
                     f"({flops.method}); MFU: {f'{peak.value:.4g} FLOP/s peak from ' if peak.value else ''}"
                     f"{peak.source}")
        self.progress = Progress(cfg.metrics.progress if main else "none", cfg.train.steps, start_step,
                                 description=cfg.run.name)
        self.profiler = build_profiler(cfg.metrics.profile, info, run_dir, start_step, log)  # None when off

    def advance(self, step: int) -> None:
        """After every step (``step`` completed)."""
        if self.profiler is not None:
            self.profiler.step()
        self.progress.advance(step)

    def plan_used(self, step: int, plan: BatchPlan) -> None:
        """After step ``step``: the plan it trained at. A new micro-batch (train.micro_batch=auto after an
        out-of-memory error) is printed, written to metrics.jsonl and to run.json's plan."""
        if plan == self.plan:
            return
        self.plan = plan
        if not self.record:
            return
        self.log.info(f"train.micro_batch=auto: training at micro_batch={plan.micro_batch} (x {plan.grad_accum} "
                      f"micro-steps) from step {step}")
        self.record.update(plan=vars(plan) | {"per_rank": plan.per_rank})
        if self.writer:
            self.writer.write({"step": step, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum})

    def logged(self, step: int, record: Dict[str, Any]) -> None:
        """A log step's record: metrics.jsonl and trackers, and the console (a non-finite loss warned about)."""
        if not math.isfinite(record["loss"]):
            self.log.warning(f"loss is {record['loss']} at step {step}: training has diverged (lower train.lr, or set "
                             f"train.grad_clip)")
        if self.writer:
            self.writer.write(record)
        self.progress.update(step, record)

    def evaluated(self, step: int, scores: Dict[str, float]) -> None:
        if self.writer:
            self.writer.write({"step": step, **scores})
        self.progress.write(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def failed(self, err: BaseException, step: int, failure: Optional[str]) -> None:
        """run.json says the run failed (or was interrupted) at ``step``, and why (``failure``, else ``err``)."""
        if not self.record:
            return
        try:
            self.record.update(status="failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                               step=step, error=failure or f"{type(err).__name__}: {err}")
        except OSError as record_err:  # e.g. the same full disk: the run's own error is the one to raise
            self.log.error(f"run.json could not record the failure: {record_err}")

    def close(self, outcome: str, checkpoint: Optional[Path] = None) -> None:
        """The console stops and the trackers learn how the run ended (finished | preempted | failed) and its newest
        committed checkpoint."""
        if self.profiler is not None:
            self.profiler.stop()
        self.progress.close()
        if self.writer:
            self.writer.close(outcome, checkpoint)

    def finished(self, preempted: bool, step: int, final: Dict[str, Any], nonfinite_steps: int) -> None:
        if self.record:
            self.record.update(status="preempted" if preempted else "finished", step=step, final=final,
                               nonfinite_steps=nonfinite_steps)


__all__ = ["RunReport"]
