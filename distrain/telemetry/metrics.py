"""The metrics writer on rank 0: metrics.jsonl (always), and every configured experiment tracker as a sink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from distrain.checkpoint.layout import checkpoints_root, read_latest
from distrain.telemetry.keep_aside import keep_aside
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
            self.kept = keep_aside(self.path)
            get_logger().info(f"metrics: this run starts at step 0; the earlier run's metrics.jsonl is kept as "
                              f"{self.kept.name}")
        self.file = open(self.path, "a", buffering=1)
        self.trackers = Trackers.open(cfg, run_dir, fresh)

    def write(self, record: Dict[str, Any]) -> None:
        clean = json_safe(record)
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.trackers.log(clean)

    def close(self, status: str = "finished") -> None:
        """Close metrics.jsonl, then give the trackers the run's end: its status (finished | failed | preempted),
        config.yaml and the newest committed checkpoint (the one `distrain ckpt export` exports). Returns at once:
        call ``wait`` after the last collective, so no other rank waits while the trackers flush."""
        self.file.close()
        self.trackers.close(RunEnd(status=status, config_file=self.run_dir / "config.yaml",
                                   checkpoint=_latest_checkpoint(self.run_dir)))

    def wait(self) -> List[str]:
        """Let the trackers flush, for at most metrics.tracker_timeout_s; the warnings of those left behind."""
        return self.trackers.wait()


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = checkpoints_root(run_dir)
    name = read_latest(root)
    return root / name if name and (root / name).is_dir() else None
