"""The metrics writer on rank 0: metrics.jsonl (always), and every configured experiment tracker as a sink."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from distrain.checkpoint.layout import checkpoints_root, read_latest
from distrain.telemetry.trackers import RunEnd, Trackers


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and hands the same record to the trackers
    (TensorBoard, MLflow, W&B: ``metrics.trackers``), which never hold up or stop training."""

    def __init__(self, run_dir: Path, cfg: DictConfig, fresh: bool):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():  # a new run from step 0 in an old run dir: keep, don't mix, the old log
            self.path.rename(run_dir / f"metrics.{int(self.path.stat().st_mtime)}.jsonl")
        self.file = open(self.path, "a", buffering=1)
        self.trackers = Trackers.open(cfg, run_dir, fresh)

    def write(self, record: Dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.trackers.log(clean)

    def close(self, status: str = "finished") -> None:
        """Close metrics.jsonl, then give the trackers the run's end: its status (finished | failed | preempted),
        config.yaml and the newest committed checkpoint (the one `distrain ckpt export` exports)."""
        self.file.close()
        self.trackers.close(RunEnd(status=status, config_file=self.run_dir / "config.yaml",
                                   checkpoint=_latest_checkpoint(self.run_dir)))


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = checkpoints_root(run_dir)
    name = read_latest(root)
    return root / name if name and (root / name).is_dir() else None
