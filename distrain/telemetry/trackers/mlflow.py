"""MLflow: one MLflow run per distrain run, through ``MlflowClient`` (no global active run to leak or collide).

Params are the resolved config (a resumed run adds the keys it changed as ``resumed.<key>`` tags, because an MLflow
param cannot change value); metrics go in with their step; at the end config.yaml is an artifact and the final
checkpoint's path a tag, and the run is marked FINISHED, FAILED or KILLED (preempted: it continues when resumed).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from distrain.telemetry.trackers.base import RunEnd, Tracker, TrackerRun

_BATCH = 100  # MLflow's limit on params or tags per log_batch call
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


class MLflowTracker(Tracker):
    name = "mlflow"
    package = "mlflow"

    def start(self, run: TrackerRun) -> Optional[str]:
        from mlflow import MlflowClient  # lazy: optional: mlflow is optional (distrain[mlflow])

        self.client = MlflowClient(tracking_uri=run.settings.get("tracking_uri") or None)
        self.existing: Dict[str, str] = {}
        if run.resume_id:
            self.run_id = run.resume_id
            self.existing = dict(self.client.get_run(self.run_id).data.params)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = run.settings.get("experiment") or "distrain"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            created = self.client.create_run(experiment_id, run_name=run.name,
                                             tags={"distrain.run_dir": str(run.run_dir.resolve())})
            self.run_id = created.info.run_id
        return self.run_id

    def log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag  # lazy: optional: mlflow is optional (distrain[mlflow])

        new = [Param(k, v) for k, v in params.items() if k not in self.existing]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in self.existing and self.existing[k] != v]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + _BATCH])
        for i in range(0, len(changed), _BATCH):
            self.client.log_batch(self.run_id, tags=changed[i:i + _BATCH])

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: optional: mlflow is optional (distrain[mlflow])

        now = int(time.time() * 1000)
        batch: List[Metric] = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, end: RunEnd) -> None:
        if end.config_file.exists():
            self.client.log_artifact(self.run_id, str(end.config_file))
        if end.checkpoint is not None:
            self.client.set_tag(self.run_id, "distrain.checkpoint", end.checkpoint.resolve().as_uri())
        self.client.set_terminated(self.run_id, status=_STATUS.get(end.status, "FINISHED"))
