"""Metrics sinks on rank 0: metrics.jsonl (always) and TensorBoard (optional)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from distrain.telemetry.logs import get_logger
from distrain.telemetry.run_record import json_safe


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl, and mirrors scalars to TensorBoard if enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool, fresh: bool):
        self.kept: Optional[Path] = None  # where an earlier run's metrics.jsonl was kept, when this run starts fresh
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():  # a new run from step 0 in an old run dir: keep, don't mix, the old log
            self.kept = _keep_aside(self.path)
            get_logger().info(f"metrics: this run starts at step 0; the earlier run's metrics.jsonl is kept as "
                              f"{self.kept.name}")
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                get_logger().warning("metrics.tensorboard=true but tensorboard is not installed "
                                     "(pip install tensorboard); writing metrics.jsonl only.")
            else:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key.endswith("_ranks") and isinstance(value, list):  # one curve per rank: peak_mem_mb_ranks/rank3
                    for rank, item in enumerate(value):
                        self.tb.add_scalar(f"{key}/rank{rank}", item, global_step=step)
                elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
