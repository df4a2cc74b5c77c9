"""Suite 5, start-up and checkpoints.

Launch-to-first-step: wall time from starting ``distrain launch --nproc-per-node 2 configs/quickstart.yaml``
to the first step record in the run's metrics.jsonl (polled), repeated; target <= 10 s on CPU. For scale, the
time a bare ``python -c "import torch"`` takes on the same machine is measured alongside.

Checkpoints: save time, size, and the step-time stall of sync vs async saves come from the checkpoint
module's own benchmark (``benchmarks/checkpoint_bench.py``), imported when it exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks import stats
from benchmarks.jobs import job_env
from benchmarks.options import Check, Options, Section, check
from benchmarks.workload import REPO

NAME = "startup"
TITLE = "5. Start-up and checkpoints"
CONFIG = "configs/quickstart.yaml"
TARGET_S = 10.0


def run(opts: Options) -> Dict[str, Any]:
    repeats = opts.pick(full=3, smoke=1)
    launches = [launch_to_first_step(opts) for _ in range(repeats)]
    imports = [_seconds([sys.executable, "-c", "import torch"], opts) for _ in range(repeats)] if not opts.smoke else []
    return {"launch_to_first_step_s": launches, "launch": stats.summary([x["first_step_s"] for x in launches]),
            "import_torch": stats.summary(imports) if imports else None, "nproc": opts.nproc, "config": CONFIG,
            "checkpoint": checkpoint_results(opts)}


def launch_to_first_step(opts: Options, timeout_s: float = 180) -> Dict[str, float]:
    """Seconds from starting `distrain launch` to the first step in metrics.jsonl, and to the process's exit."""
    with tempfile.TemporaryDirectory(prefix="distrain-bench-launch-") as tmp:
        metrics = Path(tmp) / "startup" / "metrics.jsonl"
        cmd = [sys.executable, "-m", "distrain", "launch", "--nproc-per-node", str(opts.nproc), CONFIG,
               f"run.dir={tmp}", "run.name=startup", "train.steps=3", "train.log_every=1", "train.eval_every=0",
               "metrics.progress=none", "checkpoint.at_end=false", "train.resume=never"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=job_env(opts.threads_per_rank))
        first: Optional[float] = None
        while proc.poll() is None and time.perf_counter() - start < timeout_s:
            if first is None and _has_step(metrics):
                first = time.perf_counter() - start
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        total = time.perf_counter() - start
        if first is None and _has_step(metrics):
            first = total  # the whole run finished between two polls
        if proc.returncode != 0 or first is None:
            raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): {err.strip()[-2000:]}")
        return {"first_step_s": first, "total_s": total}


def _has_step(metrics: Path) -> bool:
    try:
        return any("step" in json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return False


def _seconds(cmd: List[str], opts: Options) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=job_env(opts.threads_per_rank))
    return time.perf_counter() - start


def checkpoint_results(opts: Options) -> Dict[str, Any]:
    """The checkpoint benchmark's results (benchmarks/checkpoint_bench.py), or why there are none."""
    if importlib.util.find_spec("benchmarks.checkpoint_bench") is None:
        return {"skipped": "benchmarks/checkpoint_bench.py does not exist yet"}
    module = importlib.import_module("benchmarks.checkpoint_bench")
    entry = getattr(module, "run", None)
    if entry is None:
        return {"skipped": "benchmarks/checkpoint_bench.py has no run() entry point"}
    accepted = inspect.signature(entry).parameters
    kwargs = {k: v for k, v in {"smoke": opts.smoke, "nproc": opts.nproc}.items() if k in accepted}
    return {"results": entry(**kwargs)}


def report(result: Dict[str, Any], ctx: Any) -> Section:
    launch = result["launch"]
    checks: List[Check] = [check(NAME, "launch to first step, s (CPU, 2 ranks)", launch["median"], "<=", TARGET_S)]
    whole = stats.summary([x["total_s"] for x in result["launch_to_first_step_s"]])
    lines = [f"`distrain launch --nproc-per-node {result['nproc']} {result['config']}` until the first step record "
             f"is in metrics.jsonl ({launch['n']} launches):\n",
             "| measurement | median s | IQR s |", "| --- | --- | --- |",
             f"| launch to first step | **{launch['median']:.2f}** | {launch['iqr']:.2f} |",
             f"| whole 3-step run, to exit | {whole['median']:.2f} | {whole['iqr']:.2f} |"]
    if result["import_torch"]:
        lines.append(f"| `python -c 'import torch'` alone, for scale | {result['import_torch']['median']:.2f} | "
                     f"{result['import_torch']['iqr']:.2f} |")
    lines.append("")
    ckpt = result["checkpoint"]
    if "skipped" in ckpt:
        lines.append(f"Checkpoints: skipped: {ckpt['skipped']}.")
    else:
        lines += ["Checkpoints (benchmarks/checkpoint_bench.py):\n", checkpoint_markdown(ckpt["results"])]
    return Section(TITLE, "\n".join(lines), checks, [])


def checkpoint_markdown(results: Any) -> str:
    """The checkpoint benchmark's own markdown when it gives one, else its numbers as a key/value table."""
    if isinstance(results, dict) and isinstance(results.get("markdown"), str):
        return results["markdown"]
    flat = _flatten(results)
    return "\n".join(["| measurement | value |", "| --- | --- |"] +
                     [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat.items()])


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, (int, float, str)) else f"{prefix}{k}"))
        return out
    if isinstance(value, list):
        return {prefix.rstrip("."): ", ".join(map(str, value))}
    return {prefix.rstrip("."): value}
