"""TensorBoard: event files in <run dir>/tensorboard, written with torch's own SummaryWriter."""

from __future__ import annotations

from typing import Dict, Optional

from distrain.telemetry.trackers.base import RunEnd, Tracker, TrackerRun


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    package = "tensorboard"

    def start(self, run: TrackerRun) -> Optional[str]:
        # lazy: optional: tensorboard is optional (distrain[tensorboard])
        from torch.utils.tensorboard import SummaryWriter

        # The log directory is the run's identity: a resumed run appends to the same event files' directory.
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))
        return None

    def log_params(self, params: Dict[str, str]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, end: RunEnd) -> None:
        if end.checkpoint is not None:
            self.writer.add_text("checkpoint", str(end.checkpoint))
        self.writer.close()
