"""Scale (issue 21): how distrain's fixed costs grow with the world size W, at W = 1, 2, 4, 8, 16, 32 on this machine.

One real `distrain launch --nproc-per-node W` job per W (benchmarks/scale_jobs.py: mlp on digits, 16 samples per
rank per step, a checkpoint every 4 steps, one thread per rank), in alternating passes (ascending, then
descending W), each W's numbers pooled: start-up (launch to first step), checkpoint save-to-commit time, step time
on the fixed per-rank workload, and rank 0's peak RSS. With more ranks than cores the ranks share the cores, so
start-up and step time are also given per core-share (x cores / W): their growth is the cost beyond that sharing,
what a machine with a core per rank would see.
Growth per doubling of W is the least-squares slope of log2(cost) against log2(W) over W >= 2, as a factor.

The W-dependent part of a commit (every rank listing the checkpoint for its own files, rank 0 merging W ranks'
digests into the manifest, the gathered digests) is measured in-process up to W = 1,024 (benchmarks/commit_cost.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

from benchmarks import commit_cost, stats
from benchmarks.machine import load_average
from benchmarks.options import Options, Section
from benchmarks.scale_jobs import CONFIG, run_scale_job
from benchmarks.scale_plot import plot_scale

NAME = "scale"
TITLE = "7. Scale: fixed costs as the world grows"
MICRO = 16
COSTS = {"first_step_s": "start-up s", "first_step_per_core_share_s": "start-up s per core-share",
         "checkpoint_s": "checkpoint s", "step_s": "step ms",
         "step_per_core_share_s": "step ms per core-share", "rank0_peak_rss_mb": "rank 0 peak RSS MB",
         "checkpoint_files": "files per checkpoint"}


def run(opts: Options) -> Dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worlds = [1, 2] if opts.smoke else [1, 2, 4, 8, 16, 32]
    passes = opts.timed_rounds(full=2, smoke=1)
    steps, every = (4, 2) if opts.smoke else (12, 4)
    jobs: Dict[int, List[Dict[str, Any]]] = {w: [] for w in worlds}
    loads = []
    for p in range(passes):
        for world in (worlds if p % 2 == 0 else worlds[::-1]):
            loads.append(load_average())
            jobs[world].append(run_scale_job(world, MICRO, steps, every, opts.timeout_s))
    rows = [summarise(world, runs, cores) for world, runs in jobs.items()]
    commit_worlds = [2, 8] if opts.smoke else [32, 128, 512, 1024]
    return {"rows": rows, "growth": growth(rows), "cores": cores, "micro": MICRO, "passes": passes,
            "steps": steps, "every": every, "config": CONFIG, "load_averages": loads,
            "commit": commit_cost.run(commit_worlds, repeats=opts.pick(full=5, smoke=1))}


def summarise(world: int, runs: List[Dict[str, Any]], cores: int) -> Dict[str, Any]:
    """One W's numbers, pooled over its jobs: medians (and all values) of every cost."""
    steps = [s for r in runs for s in r["step_s"]]
    share = min(world, cores) / world  # the fraction of a core each rank gets when W > cores
    return {"world": world, "jobs": len(runs),
            "first_step_s": stats.summary([r["first_step_s"] for r in runs])["median"],
            "first_step_per_core_share_s": stats.summary([r["first_step_s"] for r in runs])["median"] * share,
            "checkpoint_s": stats.summary([s for r in runs for s in r["checkpoint_s"]])["median"],
            "step_s": stats.summary(steps)["median"],
            "step_per_core_share_s": stats.summary(steps)["median"] * share,
            "rank0_peak_rss_mb": stats.summary([r["rank0_peak_rss_mb"] for r in runs])["median"],
            "checkpoint_files": runs[0]["checkpoint_files"], "oversubscribed": world > cores, "raw": runs}


def growth(rows: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Per cost: the factor by which it grows per doubling of W (log-log least squares over W >= 2, where one
    process without a process group is not the start of the line; over every W when that leaves one point)."""
    fitted = [r for r in rows if r["world"] >= 2]
    fitted = fitted if len(fitted) >= 2 else rows
    out: Dict[str, Optional[float]] = {}
    for key in COSTS:
        points = [(math.log2(r["world"]), math.log2(r[key])) for r in fitted if r[key] > 0]
        if len(points) < 2:
            out[key] = None
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        out[key] = 2.0 ** slope
    return out


def at_1024(rows: List[Dict[str, Any]], factors: Dict[str, Optional[float]], key: str) -> Optional[float]:
    """The cost at W = 1,024 if it kept growing by its measured factor per doubling from the largest W here."""
    last, factor = rows[-1], factors.get(key)
    if factor is None:
        return None
    return last[key] * factor ** math.log2(1024 / last["world"])


def _scaled(key: str, value: Optional[float]) -> str:
    if value is None or value != value:  # none measured (nan)
        return "-"
    if key == "checkpoint_files":
        return f"{value:,.0f}"
    return f"{value * 1e3:.1f}" if key in ("step_s", "step_per_core_share_s") else f"{value:.2f}"


def report(result: Dict[str, Any], ctx: Any) -> Section:
    # From the raw numbers of every job, so `--render` redraws a saved run with the current analysis.
    rows = [summarise(r["world"], r["raw"], result["cores"]) for r in result["rows"]]
    factors = growth(rows)
    loads = result["load_averages"]
    lines = [f"`distrain launch --nproc-per-node W {result['config']}`, {result['micro']} samples per rank per step "
             f"(global batch 16 W), {result['steps']} steps, a checkpoint every {result['every']}; one thread per "
             f"rank on {result['cores']} cores, {result['passes']} alternating pass(es). Load average (1, 5, 15 min) "
             f"before the jobs: {loads[0]} ... {loads[-1]} (a loaded, shared machine: the lead may rerun it on a "
             f"quiet one).\n",
             "| W | " + " | ".join(COSTS.values()) + " |", "| --- " * (len(COSTS) + 1) + "|"]
    for r in rows:
        mark = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(f"| {r['world']}{mark} | " + " | ".join(_scaled(k, r[k]) for k in COSTS) + " |")
    lines.append("| growth per doubling of W | " + " | ".join(
        "-" if factors[k] is None else f"x{factors[k]:.2f}" for k in COSTS) + " |")
    lines.append("| W = 1,024 at that growth | " + " | ".join(_scaled(k, at_1024(rows, factors, k)) for k in COSTS)
                 + " |")
    lines += ["", "The W-dependent part of one commit, measured in this process on synthetic checkpoint directories "
                  "(benchmarks/commit_cost.py):\n",
              "| W | files | one rank lists + hashes its own ms | listing with a stat per file ms (before) | "
              "rank 0 merge + manifest ms | digests gathered KiB | manifest KiB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["commit"]:
        lines.append(f"| {c['world']:,} | {c['files']:,} | {c['rank_listing_s'] * 1e3:.2f} | "
                     f"{c['stat_listing_s'] * 1e3:.2f} | {c['rank0_manifest_s'] * 1e3:.2f} | "
                     f"{c['gathered_bytes'] / 1024:.1f} | {c['manifest_bytes'] / 1024:.1f} |")
    plots = [p for p in [plot_scale({**result, "rows": rows, "growth": factors}, ctx.out_dir)] if p]
    return Section(TITLE, "\n".join(lines), [], plots)
