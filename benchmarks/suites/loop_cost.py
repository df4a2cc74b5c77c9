"""distrain's own per-step cost (issue 20): the loop body's work besides the strategy's forward, backward and update,
in microseconds per step, against the step itself; target <= 1% of the gpt step.

One 2-rank job; for each model (mlp, gpt) a distrain Trainer (ddp) is built and, in shuffled rounds, its whole
``train_step`` is timed barrier to barrier, and each piece of the loop body that is distrain's own is timed as the
mean of a burst of calls (every rank runs the same bursts, so the collectives among them pair up):

- count: the step's item count (``Objective.step_counts``, static for both built-in losses) and, for a loss that
  counts labels on the device, the one all-reduce of the count it costs (``count_allreduce``, not in the total
  for the built-in losses);
- divergence: ``DivergenceGuard.allows_update`` (device ops only, train.on_nonfinite=stop);
- timers: ``StepTimer.begin`` and its four phase contexts on an unmeasured step, and the seven profiler labels
  (profiling off);
- lr: ``lr_at`` and ``strategy.set_lr``;
- progress: ``StepWindow.step_done`` and ``RunReport.advance`` (progress line and profiler hook);
- faults: the watchdog's ``step_started`` and ``should_stop``, the stop agreement for preemption signals (a gloo
  all-reduce of two ints when signals are handled, as under torchrun). The agreement is lagged and spaced
  (``distrain.faults.stop_agreement``: started after one step, read about a quarter second of training later),
  which a burst of calls with nothing between them cannot show: this piece is timed in ``loop_steps`` steps run
  back to back as the loop runs them, and is their mean (every other piece: the median of the rounds);
- checkpoint: ``Checkpointer.maybe_save`` on a step that is not due; compression: ``Compression.on_step``;
- metrics: the log step's record (``Trainer._log_step``: the loss and peak-memory reductions, metrics.jsonl, the
  divergence settle), divided by train.log_every (10): its share of every step.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Dict, List

import torch

from benchmarks import stats
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.rounds import settle, timed_step
from benchmarks.workload import make_workload
from distrain import dist
from distrain.env import ProcessInfo
from distrain.optim import lr_at
from distrain.telemetry.profiling import label
from distrain.telemetry.run_report import RunReport
from distrain.telemetry.step_record import StepWindow

NAME = "loop_cost"
TITLE = "distrain's own per-step cost"
TARGET = 0.01  # of the gpt step
MODELS = {"mlp": "configs/mlp.yaml", "gpt": "configs/gpt.yaml"}
LABELS = ("split", "forward", "backward", "forward", "backward", "optimizer", "sync")  # one step, two micro-steps
IN_TOTAL = ("count", "divergence", "timers", "lr", "progress", "faults", "checkpoint", "compression", "metrics")


def run(opts: Options) -> Dict[str, Any]:
    params = opts.job_params(rounds=opts.timed_rounds(full=30, smoke=2), burst=opts.pick(full=200, smoke=5),
                             warmup=opts.pick(full=3, smoke=1), loop_steps=opts.pick(full=100, smoke=4))
    return run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)


def _pieces(trainer: Any, report: RunReport, window: StepWindow, step: int) -> Dict[str, Callable[[], Any]]:
    """Each piece of the loop body's own work at ``step`` (see the module docstring), as a call."""
    batches = trainer.loader.micro_batches(step)
    loss, norm = torch.tensor(2.5, device=trainer.device), torch.tensor(1.0, device=trainer.device)
    count = torch.tensor(100, dtype=torch.int64, device=trainer.device)

    def timers() -> None:
        trainer.timer.begin(False)
        for phase in ("data", "micro", "micro", "update", "sync"):
            with trainer.timer.phase(phase):
                pass
        for name in LABELS:
            with label(name):
                pass

    def progress() -> None:
        window.step_done()
        report.advance(step + 1)

    return {"count": lambda: trainer.objective.step_counts(batches, step),
            "count_allreduce": lambda: dist.all_reduce_sum(count),
            "divergence": lambda: trainer.divergence.allows_update(step + 1, loss, norm),
            "timers": timers,
            "lr": lambda: trainer.strategy.set_lr(lr_at(step, trainer.settings)),
            "progress": progress,
            "checkpoint": lambda: trainer.checkpointer.maybe_save(step + 1),
            "compression": lambda: trainer.compression.on_step(step + 1),
            "metrics": lambda: trainer._log_step(loss, window, report)}


def _burst(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Mean seconds of ``fn()`` over ``n`` calls on this rank; the ranks start together (a collective piece then
    pairs up), and no barrier is timed (its cost, not the piece's, would dominate a short burst)."""
    settle(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / n


def _in_loop(trainer: Any, first: int, steps: int) -> List[float]:
    """Seconds of the loop's fault calls (``step_started``, ``should_stop``) in each of ``steps`` steps from
    ``first``, run back to back as ``Trainer._loop`` runs them (no barrier, nothing else between)."""
    times = []
    for step in range(first, first + steps):
        start = time.perf_counter()
        trainer.faults.step_started(step)
        spent = time.perf_counter() - start
        trainer.train_step(step)
        start = time.perf_counter()
        trainer.faults.should_stop(step + 1)
        times.append(spent + time.perf_counter() - start)
    trainer.faults.should_stop(first + steps, last=True)  # collects the agreement in flight
    return times


def _measure(model: str, params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    from distrain.training.trainer import Trainer

    work = make_workload(MODELS[model], [], info, device, params["scratch"])
    with Trainer(work.config_for("ddp", {}), train_data=work.train_data, eval_data=None) as trainer:
        report = RunReport(trainer.run_dir, trainer.cfg, info, trainer.plan, 0, trainer.throughput, device,
                           trainer.log, record_attempt=lambda record, step: None)
        window, log_every = StepWindow(), trainer.settings.log_every
        trainer.faults.training(True)  # as in fit: the per-step stop agreement runs
        for step in range(params["warmup"]):
            trainer.train_step(step)
        order = random.Random(0)  # the same shuffle on every rank: the bursts' collectives pair up
        steps: List[float] = []
        pieces: Dict[str, List[float]] = {}
        for r in range(params["rounds"]):
            step = params["warmup"] + r
            steps.append(timed_step(trainer.train_step, step, device))
            calls = list(_pieces(trainer, report, window, step).items())
            order.shuffle(calls)
            for name, fn in calls:
                pieces.setdefault(name, []).append(_burst(fn, params["burst"], device))
        faults = _in_loop(trainer, params["warmup"] + params["rounds"], params["loop_steps"])
        trainer.faults.training(False)
        report.close("finished")
    us = {name: stats.summary([t * 1e6 for t in times]) for name, times in pieces.items()}
    us["faults"] = stats.summary([t * 1e6 for t in faults])
    per_step = {name: summary["median"] for name, summary in us.items()}
    per_step["metrics"] /= log_every  # one log step in log_every
    per_step["faults"] = statistics.mean(faults) * 1e6  # the agreements' cost spread over the steps between them
    total = sum(per_step[name] for name in IN_TOTAL)
    step_us = stats.summary([t * 1e6 for t in steps])
    return {"step_us": step_us, "pieces_us": us, "per_step_us": per_step, "total_us": total,
            "fraction": total / step_us["median"], "log_every": log_every, "workload": work.describe()}


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    return {"models": {model: _measure(model, params, info, device) for model in MODELS},
            "rounds": params["rounds"], "burst": params["burst"], "loop_steps": params["loop_steps"]}


def report(result: Dict[str, Any], ctx: Any) -> Section:
    models = result["models"]
    names = list(next(iter(models.values()))["pieces_us"])
    lines = [f"Microseconds per step, median of {result['rounds']} rounds (each piece the mean of {result['burst']} "
             f"calls; faults: the mean over {result['loop_steps']} steps run as the loop runs them), 2 gloo ranks, "
             f"ddp; the step is the whole train_step, barrier to barrier.\n",
             "| piece | " + " | ".join(f"{m} us" for m in models) + " |", "| --- |" + " --- |" * len(models)]
    for name in names:
        note = "" if name in IN_TOTAL else " (only for a loss that counts labels; not in the total)"
        lines.append(f"| {name}{note} | " + " | ".join(f"{job['per_step_us'][name]:.1f}"
                                                      for job in models.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{job['total_us']:.1f}**" for job in models.values()) + " |")
    lines.append("| step | " + " | ".join(f"{job['step_us']['median']:.0f}" for job in models.values()) + " |")
    lines.append("| total / step | " + " | ".join(f"{job['fraction'] * 100:.2f}%" for job in models.values()) + " |")
    checks: List[Check] = [check(NAME, "gpt: distrain's own work / step", models["gpt"]["fraction"], "<=", TARGET)]
    return Section(TITLE, "\n".join(lines) + "\n", checks)
