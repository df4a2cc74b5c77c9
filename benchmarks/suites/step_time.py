"""Suite 1, step time vs peers: each distrain strategy against the same training hand-written with its engine.

One job per example model; inside it every contestant (distrain's Trainer with each strategy, and each raw
loop) is built in the same processes and they take turns, step by step, in shuffled rounds. The ratio is
median(distrain) / median(raw); target <= 1.02.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from benchmarks import stats
from benchmarks.contestants import build_on_all_ranks, step_time_pairs
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.rounds import interleaved_rounds
from benchmarks.workload import make_workload
from distrain.env import ProcessInfo

NAME = "step_time"
TITLE = "1. Step time vs peers"
TARGET = 1.02
# Hand-written: where each measured miss goes (attribution, fixes, what is the engine's or the measurement's). The
# report includes it below the tables, so a regenerated BENCHMARKS.md keeps it.
NOTES = Path(__file__).resolve().parents[1] / "notes" / "step_time.md"
# model -> (config, overrides, timed rounds of a full run): the mlp's steps are short, so it affords more rounds.
MODELS = {"mlp": ("configs/mlp.yaml", [], 200), "gpt": ("configs/gpt.yaml", [], 60)}


def run(opts: Options, pairs: List[str] = (), models: List[str] = ()) -> Dict[str, Any]:
    """One job per model (mlp, gpt; mlp only in a smoke run); ``pairs`` limits the strategies (labels)."""
    catalogue = step_time_pairs()
    wanted = [p for p in catalogue if not pairs or p.label in pairs]
    skipped = {p.label: p.missing() for p in wanted if p.missing()}
    runnable = [p.label for p in wanted if not p.missing()]
    models = list(models) or (["mlp"] if opts.smoke else list(MODELS))
    out: Dict[str, Any] = {"skipped": skipped, "models": {}}
    for model in models:
        config, overrides, rounds = MODELS[model]
        params = opts.job_params(config=config, overrides=overrides, pairs=runnable,
                                 rounds=opts.timed_rounds(full=rounds, smoke=3), warmup=opts.pick(full=5, smoke=1))
        out["models"][model] = run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)
    return out


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    notes: List[str] = []
    contestants: Dict[str, Any] = {}
    labels: Dict[str, str] = {}
    for pair in step_time_pairs():
        if pair.label not in params["pairs"]:
            continue
        built = build_on_all_ranks(pair.label, lambda: pair.build(work), notes)
        if built is None:
            continue
        contestants[f"{pair.label}|distrain"], contestants[f"{pair.label}|raw"] = built
        labels[pair.label] = pair.raw_label
    timings = interleaved_rounds({k: c.step for k, c in contestants.items()}, params["rounds"], params["warmup"],
                                 device)
    for c in contestants.values():
        c.close()
    rows = []
    for label, raw_label in labels.items():
        ours, theirs = timings.wall[f"{label}|distrain"], timings.wall[f"{label}|raw"]
        cpu_ours, cpu_theirs = timings.cpu[f"{label}|distrain"], timings.cpu[f"{label}|raw"]
        rows.append({"label": label, "raw_label": raw_label, "distrain": stats.summary(ours),
                     "raw": stats.summary(theirs), "ratio": stats.ratio_of_medians(ours, theirs),
                     "cpu_distrain": stats.summary(cpu_ours), "cpu_raw": stats.summary(cpu_theirs),
                     "cpu_ratio": stats.ratio_of_medians(cpu_ours, cpu_theirs),
                     "times_distrain": ours, "times_raw": theirs})
    return {"workload": work.describe(), "rows": rows, "notes": notes, "rounds": params["rounds"],
            "warmup": params["warmup"]}


def report(result: Dict[str, Any], ctx: Any, notes: bool = True) -> Section:
    lines: List[str] = []
    checks: List[Check] = []
    for model, job in result["models"].items():
        w = job["workload"]
        lines.append(f"**{model}** ({w['params']:,} parameters, global batch {w['global_batch']} = micro "
                     f"{w['micro_batch']} x accum {w['grad_accum']} x {w['world_size']} ranks, {w['optimizer']}, "
                     f"{w['precision']}; {job['rounds']} timed rounds after {job['warmup']} warm-up rounds)\n")
        lines.append("| strategy | reference loop | distrain median ms (IQR) | raw median ms (IQR) | ratio | 95% CI "
                     "| target | met | main-thread CPU ratio (95% CI) |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in job["rows"]:
            r, cpu = row["ratio"], row["cpu_ratio"]
            c = check(NAME, f"{model}: {row['label']} / {row['raw_label']}", r["ratio"], "<=", TARGET)
            checks.append(c)
            lines.append(f"| {row['label']} | {row['raw_label']} | {_ms(row['distrain'])} | {_ms(row['raw'])} | "
                         f"{r['ratio']:.3f} | {r['ci_lo']:.3f}-{r['ci_hi']:.3f} | <= {TARGET} | "
                         f"{'yes' if c.met else 'no'} | {cpu['ratio']:.3f} ({cpu['ci_lo']:.3f}-{cpu['ci_hi']:.3f}) |")
        for note in job["notes"]:
            lines.append(f"\n- {note}")
        lines.append("")
    lines.append("The ratio (target) is of wall-clock medians, barrier to barrier. The main-thread CPU ratio compares "
                 "the CPU time each side's Python/C++ main thread spent in the step: it does not see waiting, so "
                 "other processes on a shared machine barely move it, and it isolates the framework's own work "
                 "(but not what runs on the backend's threads).\n")
    for label, why in result["skipped"].items():
        lines.append(f"- skipped **{label}**: {why}.")
    if notes and NOTES.is_file():  # the hand-written attribution, once per report (ddp_overhead reuses this)
        lines.append("\n" + NOTES.read_text().strip() + "\n")
    plots = [ctx.plot_step_time(result)] if result["models"] else []
    return Section(TITLE, "\n".join(lines), checks, [p for p in plots if p])


def _ms(s: Dict[str, float]) -> str:
    return f"{s['median'] * 1e3:.2f} ({s['iqr'] * 1e3:.2f})"
