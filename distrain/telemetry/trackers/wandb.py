"""Weights & Biases: one W&B run per distrain run, continued by id when the run resumes.

Every record is logged with its ``step`` as the x-axis (``define_metric``), not as W&B's own step: a run resumed
from a checkpoint logs steps it already logged once (after the checkpoint, before the stop), and W&B drops rows
whose own step goes backwards. ``mode: offline`` writes the run under <run dir>/wandb for a later `wandb sync`.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Dict, Optional

from distrain.telemetry.trackers.base import RunEnd, Tracker, TrackerRun


class WandbTracker(Tracker):
    name = "wandb"
    package = "wandb"

    def start(self, run: TrackerRun) -> Optional[str]:
        import wandb  # lazy: optional: wandb is optional (distrain[wandb])

        settings = run.settings
        run_id = run.resume_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=settings.get("project") or "distrain", entity=settings.get("entity") or None,
                              mode=settings.get("mode") or "online", dir=str(run.run_dir), name=run.name, id=run_id,
                              resume="allow", config=run.config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        return run_id

    def log_params(self, params: Dict[str, str]) -> None:
        pass  # wandb.init already recorded the resolved config (nested, as W&B shows it)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log({"step": step, **metrics})

    def finish(self, end: RunEnd) -> None:
        self.run.summary["status"] = end.status
        if end.checkpoint is not None:
            self.run.summary["checkpoint"] = end.checkpoint.resolve().as_uri()
        if end.config_file.exists():  # a copy under its own name: W&B keeps the run's config as config.yaml
            saved = Path(self.run.dir) / "distrain-config.yaml"
            shutil.copyfile(end.config_file, saved)
            self.run.save(str(saved), base_path=self.run.dir, policy="now")
        self.run.finish(exit_code=0 if end.status != "failed" else 1)
