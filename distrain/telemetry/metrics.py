"""Metrics sinks on rank 0: metrics.jsonl (always) and TensorBoard (optional)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

from distrain.telemetry.logs import get_logger


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl, and mirrors scalars to TensorBoard if enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool, fresh: bool):
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():  # a new run from step 0 in an old run dir: keep, don't mix, the old log
            self.path.rename(run_dir / f"metrics.{int(self.path.stat().st_mtime)}.jsonl")
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from distrain.extras import install_hint

                get_logger().warning(f"metrics.tensorboard=true but tensorboard is not installed "
                                     f"({install_hint('tensorboard')}); writing metrics.jsonl only.")
            else:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
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
