"""One real `distrain launch --nproc-per-node W` job of the scale suite, and what it measured.

The job trains configs/mlp.yaml with a fixed per-rank workload (``micro`` samples per rank per step, so the global
batch is ``micro x W``), logs every step and checkpoints every ``every`` steps. Read back afterwards:

- start-up: wall time from starting the launcher to the first step record in metrics.jsonl (polled);
- checkpoint: the seconds of every save, from rank 0's log line ``checkpoint: saved step N (...) in X s`` (the DCP
  write of every rank's shard, each rank hashing its own files, the gather of the digests, rank 0's manifest and
  rename: everything between the start of the save and its commit);
- step: ``step_time_s`` of every step record after the first two (warm-up);
- rank 0's memory: the peak RSS rank 0 reports in ``peak_mem_mb_ranks`` (getrusage; the step records' maximum).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.jobs import JobFailed, job_env
from benchmarks.workload import REPO

CONFIG = "configs/mlp.yaml"
RUN = "scale"
SAVED = re.compile(r"checkpoint: saved step (\d+) \(every\) .* in ([0-9.]+) s")


def launch_command(world: int, run_dir: Path, micro: int, steps: int, every: int) -> List[str]:
    return [sys.executable, "-m", "distrain", "launch", "--nproc-per-node", str(world), CONFIG,
            f"run.dir={run_dir}", f"run.name={RUN}", f"train.steps={steps}", f"train.global_batch={micro * world}",
            f"train.micro_batch={micro}", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
            "metrics.progress=none", f"checkpoint.every={every}", "checkpoint.at_end=false", "train.resume=never",
            "dist.timeout_s=900"]


def run_scale_job(world: int, micro: int, steps: int, every: int, timeout_s: float) -> Dict[str, Any]:
    """Launch one job of ``world`` ranks on this machine; its start-up, checkpoint, step and memory numbers."""
    with tempfile.TemporaryDirectory(prefix="distrain-bench-scale-") as tmp:
        run_dir = Path(tmp)
        metrics = run_dir / RUN / "metrics.jsonl"
        start = time.perf_counter()
        proc = subprocess.Popen(launch_command(world, run_dir, micro, steps, every), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=job_env(1))
        first = _first_step_seconds(proc, metrics, start, timeout_s)
        try:
            _, err = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise JobFailed(f"the scale job at W={world} did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or first is None:
            raise JobFailed(f"the scale job at W={world} failed (exit {proc.returncode}): {err.strip()[-2000:]}")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if '"step_time_s"' in line]
        saves = [float(s) for _, s in SAVED.findall((run_dir / RUN / "logs" / "rank0.log").read_text())]
        checkpoint = next(iter(sorted((run_dir / RUN / "checkpoints").glob("step_*"))), None)
        return {"world": world, "first_step_s": first, "total_s": time.perf_counter() - start,
                "step_s": [r["step_time_s"] for r in records[2:]], "checkpoint_s": saves,
                "rank0_peak_rss_mb": max(r["peak_mem_mb_ranks"][0] for r in records),
                "checkpoint_files": _file_count(checkpoint)}


def _first_step_seconds(proc: subprocess.Popen, metrics: Path, start: float, timeout_s: float) -> Optional[float]:
    """Seconds from ``start`` until metrics.jsonl holds a step record (polled), or None if the job ended first."""
    while proc.poll() is None and time.perf_counter() - start < timeout_s:
        if _has_step(metrics):
            return time.perf_counter() - start
        time.sleep(0.05)
    return time.perf_counter() - start if _has_step(metrics) else None  # finished between two polls


def _has_step(metrics: Path) -> bool:
    try:
        return '"step_time_s"' in metrics.read_text()
    except OSError:
        return False


def _file_count(checkpoint: Optional[Path]) -> int:
    return 0 if checkpoint is None else sum(1 for p in checkpoint.rglob("*") if p.is_file())
