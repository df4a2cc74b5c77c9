"""The metrics writer on rank 0: metrics.jsonl (always), and every configured experiment tracker as a sink.

metrics.jsonl holds one record per step and kind (train, eval) of the run's one line of history: a resume from a
checkpoint at step S first moves the records of steps after S (logged by an attempt that stopped before its next
checkpoint, and about to be logged again) to metrics.abandoned.<mtime>.jsonl, so every reader and plot sees the
values of the attempt that continued, and nothing is lost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from distrain.telemetry.keep_aside import keep_aside
from distrain.telemetry.logs import get_logger
from distrain.telemetry.run_record import json_safe
from distrain.telemetry.trackers import RunEnd, Trackers


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and hands the same record to the trackers
    (TensorBoard, MLflow, W&B: ``metrics.trackers``), which never hold up or stop training."""

    def __init__(self, run_dir: Path, cfg: DictConfig, fresh: bool, start_step: int = 0):
        self.run_dir = run_dir
        # where an earlier run's metrics.jsonl was kept (a fresh start), or an abandoned attempt's tail (a resume)
        self.kept: Optional[Path] = None
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():  # a new run from step 0 in an old run dir: keep, don't mix, the old log
            self.kept = keep_aside(self.path)
            get_logger().info(f"metrics: this run starts at step 0; the earlier run's metrics.jsonl is kept as "
                              f"{self.kept.name}")
        elif self.path.exists():
            self.kept = set_aside_abandoned(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        self.trackers = Trackers.open(cfg, run_dir, fresh)

    def write(self, record: Dict[str, Any]) -> None:
        clean = json_safe(record)
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.trackers.log(clean)

    def close(self, status: str = "finished", checkpoint: Optional[Path] = None) -> None:
        """Close metrics.jsonl, then give the trackers the run's end: its status (finished | failed | preempted),
        config.yaml and ``checkpoint``, the newest committed one (the one `distrain ckpt export` exports). Returns at once:
        call ``wait`` after the last collective, so no other rank waits while the trackers flush."""
        self.file.close()
        self.trackers.close(RunEnd(status=status, config_file=self.run_dir / "config.yaml",
                                   checkpoint=checkpoint))

    def wait(self) -> List[str]:
        """Let the trackers flush, for at most metrics.tracker_timeout_s; the warnings of those left behind."""
        return self.trackers.wait()


def set_aside_abandoned(path: Path, start_step: int) -> Optional[Path]:
    """Move the records of steps after ``start_step`` (and any torn line a kill left) out of metrics.jsonl into
    metrics.abandoned.<mtime>[-N].jsonl, never over an existing file; returns that file, or None when there were none.
    The kept records are written to a temporary file and renamed over metrics.jsonl: a crash in between leaves the
    tail in both files, never in neither."""
    keep, tail = [], []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            (keep if _step_of(line) <= start_step else tail).append(line)
    if not tail:
        return None
    pending = path.with_name(".metrics.abandoned.tmp")
    pending.write_text("\n".join(tail) + "\n")
    kept = keep_aside(pending, like=path.with_name("metrics.abandoned.jsonl"))
    rewritten = path.with_name(".metrics.jsonl.tmp")
    rewritten.write_text("".join(line + "\n" for line in keep))
    os.replace(rewritten, path)
    steps = sorted({int(s) for s in map(_step_of, tail) if s != math.inf})
    get_logger().info(f"metrics: resuming at step {start_step}; the {len(tail)} record(s) an earlier attempt logged "
                      f"after it{f' (steps {steps[0]}-{steps[-1]})' if steps else ''} are kept in {kept.name}, "
                      f"and this attempt logs those steps again")
    return kept


def _step_of(line: str) -> float:
    """A record's step; infinity for a line that does not parse (torn by a kill), so it goes with the tail."""
    try:
        record = json.loads(line)
        return float(record["step"]) if isinstance(record, dict) and "step" in record else math.inf
    except (ValueError, TypeError):
        return math.inf

