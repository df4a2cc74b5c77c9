"""The metrics writer on rank 0: metrics.jsonl (always), and every configured experiment tracker as a sink."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from distrain.telemetry.logs import get_logger
from distrain.telemetry.run_record import json_safe
from distrain.telemetry.trackers import RunEnd, Trackers


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and hands the same record to the trackers
    (TensorBoard, MLflow, W&B: ``metrics.trackers``), which never hold up or stop training."""

    def __init__(self, run_dir: Path, cfg: DictConfig, fresh: bool):
        self.run_dir = run_dir
        self.kept: Optional[Path] = None  # where an earlier run's metrics.jsonl was kept, when this run starts fresh
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():  # a new run from step 0 in an old run dir: keep, don't mix, the old log
            self.kept = _keep_aside(self.path)
            get_logger().info(f"metrics: this run starts at step 0; the earlier run's metrics.jsonl is kept as "
                              f"{self.kept.name}")
        self.file = open(self.path, "a", buffering=1)
        self.trackers = Trackers.open(cfg, run_dir, fresh)

    def write(self, record: Dict[str, Any]) -> None:
        clean = json_safe(record)
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.trackers.log(clean)

    def close(self, status: str = "finished", checkpoint: Optional[Path] = None) -> None:
        """Close metrics.jsonl, then give the trackers the run's end: its status (finished | failed | preempted),
        config.yaml and ``checkpoint``, the newest committed one (the one `distrain ckpt export` exports)."""
        self.file.close()
        self.trackers.close(RunEnd(status=status, config_file=self.run_dir / "config.yaml", checkpoint=checkpoint))


def _keep_aside(path: Path) -> Path:
    """Rename an earlier run's metrics.jsonl to metrics.<mtime>[-N].jsonl, never over an existing file: returns it.

    os.link refuses an existing name atomically (a plain rename would replace it: two fresh starts within one second
    would lose the first one's metrics).
    """
    stamp = int(path.stat().st_mtime)
    for n in range(1000):
        target = path.with_name(f"metrics.{stamp}{f'-{n}' if n else ''}.jsonl")
        try:
            os.link(path, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: the lock on the run directory rules out a race
            if target.exists():
                continue
            os.rename(path, target)
            return target
        os.unlink(path)
        return target
    raise FileExistsError(f"no free name to keep {path} aside")
