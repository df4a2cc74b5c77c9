"""Metrics sinks on rank 0: metrics.jsonl (always), a progress bar or plain lines, TensorBoard (optional)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from distrain.logs import get_logger


class Progress:
    """The console view on rank 0: a live tqdm bar on a TTY, one plain line per log step otherwise (SLURM log
    files, pipes), or nothing. Both show step/total, the smoothed loss, lr, samples/s (tokens/s for text) and
    the ETA; the bar moves every step, its numbers change on log steps."""

    def __init__(self, mode: str, total: int, initial: int, description: str):
        self.mode = mode
        if mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "plain"
        self.total = total
        self.bar = None
        self._redirect = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
            self._redirect = logging_redirect_tqdm(loggers=[get_logger()])  # log lines print above the bar
            self._redirect.__enter__()
        self.smoothed: Optional[float] = None
        self.started = time.perf_counter()
        self.initial = initial

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` completed steps (called every step; cheap, tqdm throttles redraws)."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def update(self, step: int, record: Dict[str, Any]) -> None:
        """Show progress after step ``step`` (1-based count of completed steps) with the logged record."""
        loss = record["loss"]
        if math.isfinite(loss):  # one inf/nan must not poison the average forever; the raw loss still shows it
            self.smoothed = loss if self.smoothed is None else 0.7 * self.smoothed + 0.3 * loss
        smoothed = self.smoothed if self.smoothed is not None else loss
        rate_key = "tokens_per_s" if "tokens_per_s" in record else "samples_per_s"
        rate_name = "tok/s" if rate_key == "tokens_per_s" else "samples/s"
        mfu = record.get("mfu")
        if self.bar is not None:
            self.advance(step)
            self.bar.set_postfix_str(f"loss={smoothed:.4f} lr={record['lr']:.2e} {rate_name}={record[rate_key]:,.0f}"
                                     + (f" mfu={100 * mfu:.1f}%" if mfu is not None else ""), refresh=True)
        elif self.mode == "plain":
            done = step - self.initial
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            get_logger().info(f"step {step}/{self.total} loss {loss:.4f} (smoothed {smoothed:.4f}) "
                              f"lr {record['lr']:.2e} {rate_name} {record[rate_key]:,.0f}"
                              + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" eta {_fmt_time(eta)}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[distrain] {line}", file=sys.stderr)  # above the bar, looking like the log lines
        elif self.mode != "none":
            get_logger().info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
                get_logger().warning("metrics.tensorboard=true but tensorboard is not installed "
                                     "(pip install tensorboard); writing metrics.jsonl only.")
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
