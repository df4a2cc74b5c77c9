"""The console view on rank 0: a live tqdm bar on a TTY, plain lines otherwise (SLURM logs, pipes), or nothing."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, Optional

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from distrain.telemetry.logs import get_logger
from distrain.telemetry.units import format_duration


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
        # No rate for a window that held only torch.compile's warm-up step (it is not a step time).
        rate = f"{record[rate_key]:,.0f}" if rate_key in record else "(compile warm-up)"
        mfu = record.get("mfu")
        if self.bar is not None:
            self.advance(step)
            self.bar.set_postfix_str(f"loss={smoothed:.4f} lr={record['lr']:.2e} {rate_name}={rate}"
                                     + (f" mfu={100 * mfu:.1f}%" if mfu is not None else ""), refresh=True)
        elif self.mode == "plain":
            done = step - self.initial
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            get_logger().info(f"step {step}/{self.total} loss {loss:.4f} (smoothed {smoothed:.4f}) "
                              f"lr {record['lr']:.2e} {rate_name} {rate}"
                              + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" eta {format_duration(eta)}")

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
