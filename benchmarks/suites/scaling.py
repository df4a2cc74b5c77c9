"""Suite 4, scaling: samples/s at W = 1, 2 (and 3, oversubscribed on a 2-core machine) for ddp and local_sgd,
and bytes communicated per sample for ddp against local_sgd with H = 1, 4, 8, 16.

Weak scaling: every rank keeps the same micro-batch (global batch = micro x W), one thread per rank. Jobs at
different world sizes cannot share processes, so they run in alternating passes (W=1, 2, 3, W=1, 2, 3, ...)
and each W's step times are pooled over the passes. Bytes per sample come from torch.profiler's record of the
collectives over 16 steps (a whole number of periods for every H), in the first W=2 job.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from benchmarks import stats
from benchmarks.comm_count import collective_bytes, wire_bytes
from benchmarks.contestants import DistrainContestant, build_on_all_ranks, strategy_missing
from benchmarks.jobs import run_job
from benchmarks.options import Options, Section
from benchmarks.rounds import interleaved_rounds
from benchmarks.workload import make_workload
from distrain.env import ProcessInfo

NAME = "scaling"
TITLE = "4. Scaling"
CONFIG = "configs/gpt.yaml"
MICRO = 16  # samples per rank per step
SCALING_H = 8  # local_sgd's period in the samples/s comparison
PERIODS = [1, 4, 8, 16]


def run(opts: Options) -> Dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worlds = [1, 2] if opts.smoke else [1, 2, 3]
    passes = 1 if opts.smoke else 2
    contestants = {"ddp": ("ddp", {})}
    skipped: Dict[str, str] = {}
    why = strategy_missing("local_sgd")
    if why:
        skipped["local_sgd"] = why
    else:
        contestants[f"local_sgd (H={SCALING_H})"] = ("local_sgd", {"sync_every": SCALING_H})
    periods = [] if "local_sgd" in skipped else [1, 4] if opts.smoke else PERIODS
    profiled = {"ddp": ("ddp", {})}
    profiled.update({f"local_sgd H={h}": ("local_sgd", {"sync_every": h}) for h in periods})
    timings: Dict[str, Dict[str, List[float]]] = {str(w): {} for w in worlds}
    comm: Dict[str, Any] = {}
    for p in range(passes):
        for w in worlds:
            # The first pass at the comparison world size also profiles the bytes per sample of every period.
            profile = p == 0 and w == opts.nproc
            params = opts.job_params(config=CONFIG, overrides=[f"train.global_batch={MICRO * w}",
                                                               f"train.micro_batch={MICRO}"],
                                     contestants=contestants, rounds=opts.timed_rounds(full=40, smoke=2),
                                     warmup=opts.pick(full=3, smoke=1), profiled=profiled if profile else {},
                                     profile_steps=max(periods + [4]))
            job = run_job(NAME, params, w, opts.threads_per_rank, opts.timeout_s)
            for label, times in job["times"].items():
                timings[str(w)].setdefault(label, []).extend(times)
            if profile:
                comm = {"world_size": w, "bytes_per_sample": job["bytes_per_sample"], "notes": job["notes"]}
    rows = []
    for w, per_label in timings.items():
        for label, times in per_label.items():
            s = stats.summary(times)
            rows.append({"world": int(w), "label": label, "step": s, "samples_per_s": MICRO * int(w) / s["median"],
                         "oversubscribed": int(w) * opts.threads_per_rank > cores})
    return {"rows": rows, "cores": cores, "micro": MICRO, "passes": passes, "skipped": skipped, "bytes": comm}


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    notes: List[str] = []
    built: Dict[str, DistrainContestant] = {}
    for label, (strategy, kwargs) in params["contestants"].items():
        c = build_on_all_ranks(label, lambda: DistrainContestant(work, strategy, kwargs), notes)
        if c is not None:
            built[label] = c
    times = interleaved_rounds({k: c.step for k, c in built.items()}, params["rounds"], params["warmup"],
                               device).wall
    for c in built.values():
        c.close()
    bytes_per_sample: Dict[str, Any] = {}
    n = params["profile_steps"]
    for label, (strategy, kwargs) in params["profiled"].items():
        c = build_on_all_ranks(label, lambda: DistrainContestant(work, strategy, kwargs), notes)
        if c is None:
            continue
        counted = collective_bytes(lambda: [c.step(s) for s in range(n)])  # a whole number of periods
        c.close()
        bytes_per_sample[label] = {
            "collectives": counted, "steps": n,
            "wire_bytes_per_sample": wire_bytes(counted, info.world_size) / (n * work.plan.global_batch),
            "payload_bytes_per_sample": sum(counted.values()) / (n * work.plan.global_batch)}
    return {"world_size": info.world_size, "notes": notes, "workload": work.describe(), "times": times,
            "bytes_per_sample": bytes_per_sample}


def report(result: Dict[str, Any], ctx: Any) -> Section:
    lines = [f"gpt example, {result['micro']} samples per rank per step (weak scaling), 1 thread per rank, "
             f"{result['cores']} cores; step times pooled over {result['passes']} alternating passes.\n",
             "| W | contestant | step median ms (IQR) | samples/s | speed-up vs W=1 | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = {r["label"]: r["samples_per_s"] for r in result["rows"] if r["world"] == 1}
    for r in sorted(result["rows"], key=lambda r: (r["label"], r["world"])):
        note = "oversubscribed: more ranks than cores" if r["oversubscribed"] else ""
        speedup = r["samples_per_s"] / base[r["label"]] if r["label"] in base else float("nan")
        lines.append(f"| {r['world']} | {r['label']} | {r['step']['median'] * 1e3:.2f} ({r['step']['iqr'] * 1e3:.2f})"
                     f" | {r['samples_per_s']:,.0f} | {speedup:.2f}x | {note} |")
    per = result["bytes"].get("bytes_per_sample", {})
    if per:
        lines += ["", f"Bytes communicated per sample at W={result['bytes']['world_size']} (profiler, over "
                      f"{next(iter(per.values()))['steps']} steps):\n",
                  "| contestant | collective payload bytes / sample | bytes on the wire per rank / sample | vs ddp |",
                  "| --- | --- | --- | --- |"]
        ddp = per.get("ddp", {}).get("wire_bytes_per_sample") or float("nan")
        for label, b in per.items():
            lines.append(f"| {label} | {b['payload_bytes_per_sample']:,.0f} | {b['wire_bytes_per_sample']:,.0f} | "
                         f"{b['wire_bytes_per_sample'] / ddp:.3f} |")
    lines += [f"- skipped **{k}**: {v}." for k, v in result["skipped"].items()]
    plots = [p for p in [ctx.plot_scaling(result)] if p]
    return Section(TITLE, "\n".join(lines), [], plots)
