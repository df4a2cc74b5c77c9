"""Issue 20's cost check: step time with straggler tracking on (metrics.straggler_factor=1.5, the default) against
off (metrics.straggler_factor=0), profiling off in both; target <= 1.01.

One job per example model (mlp, gpt; 2 gloo ranks). Both Trainers live in the same processes and take turns in
shuffled rounds (benchmarks/rounds.py). Tracking costs something only on log steps (a timed all-reduce of one
number after the data phase, three more numbers in the log step's peak-memory all-reduce, the table's arithmetic),
so a round is one whole log window, as the loop runs it: ``train.log_every`` steps, then the log step's record
written to metrics.jsonl. The time per step is the round's time / log_every.

On a busy machine the two sides' wall times differ by more than the cost sought, so the job also times what
tracking adds to a log window by itself, back to back: the all-reduce of one number and the comparison of the
ranks' times (``StragglerTracker.fields``), as a fraction of the untracked window; its target is the same 1%.

Runnable by name (`python -m benchmarks stragglers`); not part of the default run (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

import torch

from benchmarks import stats
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.rounds import interleaved_rounds, settle
from benchmarks.workload import Workload, make_workload
from distrain import dist
from distrain.env import ProcessInfo
from distrain.telemetry.run_report import RunReport
from distrain.telemetry.step_record import StepWindow
from distrain.telemetry.stragglers import StragglerTracker
from distrain.training.trainer import Trainer

NAME = "stragglers"
TITLE = "Straggler tracking: its cost per step"
TARGET = 1.01
# model -> (config, timed rounds of a full run); a round is one log window (train.log_every steps, 10 by default)
MODELS = {"mlp": ("configs/mlp.yaml", 100), "gpt": ("configs/gpt.yaml", 20)}
SETTINGS = {"on": 1.5, "off": 0.0}  # metrics.straggler_factor


class LogWindow:
    """A Trainer driven as ``Trainer._loop`` drives it: one call is ``log_every`` steps, then the log step's record
    (collective: the loss and every rank's numbers reduced, metrics.jsonl written on rank 0)."""

    def __init__(self, work: Workload, factor: float):
        cfg = work.config_for(work.cfg.strategy.name, dict(work.cfg.strategy.kwargs))
        cfg.metrics.straggler_factor = factor
        self.trainer = t = Trainer(cfg, train_data=work.train_data, eval_data=None)
        self.report = RunReport(t.run_dir, t.cfg, t.info, t.plan, t.step, t.throughput, t.device, t.log,
                                record_attempt=t.faults.record_attempt)
        self.window, self.every = StepWindow(), t.settings.log_every

    def run(self, round_: int) -> None:
        t = self.trainer
        loss = None
        for step in range(round_ * self.every, (round_ + 1) * self.every):
            loss = t.train_step(step)  # the last one is a log step: its phases are timed
            t.step = step + 1
            self.window.step_done()
        t._log_step(loss, self.window, self.report)  # the loop's own log step, as fit runs it

    def close(self) -> None:
        self.report.close("finished")
        self.trainer.close()


def run(opts: Options) -> Dict[str, Any]:
    models = ["mlp"] if opts.smoke else list(MODELS)
    out: Dict[str, Any] = {"models": {}}
    for model in models:
        config, rounds = MODELS[model]
        params = opts.job_params(config=config, rounds=opts.timed_rounds(full=rounds, smoke=3),
                                 warmup=opts.pick(full=2, smoke=1))
        out["models"][model] = run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)
    return out


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], [], info, device, params["scratch"])
    sides = {label: LogWindow(work, factor) for label, factor in SETTINGS.items()}
    every = sides["on"].every
    timings = interleaved_rounds({label: side.run for label, side in sides.items()}, params["rounds"],
                                 params["warmup"], device)
    records = sides["on"].trainer.recorder.stragglers is not None  # tracking really on at this world size
    for side in sides.values():
        side.close()
    on = [t / every for t in timings.wall["on"]]
    off = [t / every for t in timings.wall["off"]]
    added = own_work(info.world_size, device, repeats=params["rounds"] * 5)
    added["fraction_of_window"] = added["per_window_s"] / (stats.summary(off)["median"] * every)
    return {"workload": work.describe(), "log_every": every, "rounds": params["rounds"], "warmup": params["warmup"],
            "tracking_active": records, "on": stats.summary(on), "off": stats.summary(off), "added": added,
            "ratio": stats.ratio_of_medians(on, off),
            "cpu_ratio": stats.ratio_of_medians(timings.cpu["on"], timings.cpu["off"]),
            "times_on": on, "times_off": off}


def own_work(world_size: int, device: torch.device, repeats: int) -> Dict[str, float]:
    """Median seconds of what tracking adds to a log window, each part timed back to back ``repeats`` times: the
    timed all-reduce of one number after the data phase, and the comparison of the ranks' times."""
    settle(device)
    reduce_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce_sum(torch.zeros(1, device=device))
        reduce_s.append(time.perf_counter() - start)
    tracker = StragglerTracker(factor=1.5, window=3, world_size=world_size)
    rows = [[0.001, 0.010, 0.002]] * world_size  # even ranks: nothing to warn about, as in a healthy run
    compare_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        tracker.fields(1, rows)
        compare_s.append(time.perf_counter() - start)
    reduce, compare = statistics.median(reduce_s), statistics.median(compare_s)
    return {"all_reduce_s": reduce, "compare_s": compare, "per_window_s": reduce + compare}


def report(result: Dict[str, Any], ctx: Any) -> Section:
    lines = ["| model | ranks | log_every | rounds | tracking on: ms per step (IQR) | off: ms per step (IQR) | ratio | "
             "95% CI | target | met | main-thread CPU ratio (95% CI) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    checks: List[Check] = []
    for model, job in result["models"].items():
        r, cpu = job["ratio"], job["cpu_ratio"]
        c = check(NAME, f"{model}: step time with straggler tracking / without", r["ratio"], "<=", TARGET)
        checks.append(c)
        lines.append(f"| {model} | {job['workload']['world_size']} | {job['log_every']} | {job['rounds']} | "
                     f"{_ms(job['on'])} | {_ms(job['off'])} | {r['ratio']:.4f} | {r['ci_lo']:.4f}-{r['ci_hi']:.4f} | "
                     f"<= {TARGET} | {'yes' if c.met else 'no'} | {cpu['ratio']:.4f} ({cpu['ci_lo']:.4f}-"
                     f"{cpu['ci_hi']:.4f}) |")
    lines += ["", "What tracking adds to a log window by itself (medians, timed back to back in the same job):", "",
              "| model | all-reduce of one number, us | comparing the ranks' times, us | per log window, us | "
              "fraction of the untracked window | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for model, job in result["models"].items():
        a = job["added"]
        c = check(NAME, f"{model}: tracking's own work / untracked log window", a["fraction_of_window"], "<=", 0.01)
        checks.append(c)
        lines.append(f"| {model} | {a['all_reduce_s'] * 1e6:.0f} | {a['compare_s'] * 1e6:.0f} | "
                     f"{a['per_window_s'] * 1e6:.0f} | {a['fraction_of_window']:.4f} | <= 0.01 | "
                     f"{'yes' if c.met else 'no'} |")
    lines.append("\nA round is one log window (log_every steps and the log step's record, as the loop runs them), "
                 "each side's rounds interleaved in shuffled order in the same processes; profiling is off in both. "
                 "Tracking on: metrics.straggler_factor=1.5 (default), off: 0.")
    return Section(TITLE, "\n".join(lines), checks, [])


def _ms(s: Dict[str, float]) -> str:
    return f"{s['median'] * 1e3:.3f} ({s['iqr'] * 1e3:.3f})"
