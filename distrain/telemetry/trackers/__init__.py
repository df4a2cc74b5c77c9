"""Experiment trackers (TensorBoard, MLflow, W&B) as sinks of the metrics writer on rank 0.

``Trackers.open`` starts the ones ``metrics.trackers`` names (plus ``metrics.tensorboard: true``, the older key),
each behind a ``TrackerSink``; ``log`` hands every record to all of them, ``close`` hands them the run's end and
returns at once, and ``wait`` lets them flush for at most ``metrics.tracker_timeout_s`` (rank 0 calls it after the
last collective: no other rank waits on a tracker, and a tracker never fails a finished run). Each
tracker's run id is kept in <run dir>/trackers.json, so a requeued or resumed run continues the same tracker run.
A new tracker is one file here and one entry in ``TRACKERS``; a user's own is named by its import path.
"""

from __future__ import annotations

import atexit
import importlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from distrain.telemetry.keep_aside import keep_aside
from distrain.telemetry.logs import console_warning
from distrain.registry import Registry
from distrain.telemetry.trackers.base import (RunEnd, Tracker, TrackerRun, TrackerSink, flatten_params,
                                              numeric_metrics)

# metrics.trackers entries: built-ins imported on use (each is a pip extra), or a user's Tracker subclass by path.
TRACKERS = Registry("tracker", "metrics.trackers", "Tracker subclass",
                    check=lambda cls: isinstance(cls, type) and issubclass(cls, Tracker), entries={
                        "tensorboard": "distrain.telemetry.trackers.tensorboard:TensorBoardTracker",
                        "mlflow": "distrain.telemetry.trackers.mlflow:MLflowTracker",
                        "wandb": "distrain.telemetry.trackers.wandb:WandbTracker",
                    })
IDS_FILE = "trackers.json"


def tracker_names(cfg: DictConfig) -> List[str]:
    """metrics.trackers, with tensorboard added when the older metrics.tensorboard=true asks for it."""
    names = list(cfg.metrics.trackers)
    if cfg.metrics.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def build_tracker(name: str) -> Tracker:
    return TRACKERS.resolve(name)()


class Trackers:
    """The trackers of one run on rank 0; every call returns at once (the work happens on each sink's thread)."""

    def __init__(self, run_dir: Path, sinks: List[TrackerSink], ids: Dict[str, str], timeout_s: float = 10.0):
        self.run_dir = run_dir
        self.sinks = sinks
        self.timeout_s = timeout_s  # metrics.tracker_timeout_s: the most the run's end waits for them
        self._ids = ids
        self._lock = threading.Lock()
        self._closed_at: Optional[float] = None

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, fresh: bool) -> "Trackers":
        """Start (or, unless ``fresh``, continue) each configured tracker and log the resolved config."""
        ids_path = run_dir / IDS_FILE
        ids: Dict[str, str] = {}
        if ids_path.exists():
            if fresh:  # a new run from step 0 in an old run dir: keep the old ids aside, start new tracker runs
                keep_aside(ids_path)  # never over the ids an earlier fresh start kept aside
            else:
                ids = json.loads(ids_path.read_text())
        config = OmegaConf.to_container(cfg, resolve=True)
        group = cls(run_dir, [], ids, float(cfg.metrics.tracker_timeout_s))
        params = flatten_params(config)
        for name in tracker_names(cfg):
            if name not in TRACKERS:  # a user's own: a bad path is refused here, not warned about on the sink's thread
                TRACKERS.resolve(name)
            settings = OmegaConf.to_container(cfg.metrics[name]) if name in cfg.metrics and \
                OmegaConf.is_dict(cfg.metrics[name]) else {}
            sink = TrackerSink(_LazyTracker(name), group._remember)
            sink.submit("start", TrackerRun(run_dir=run_dir, name=cfg.run.name, config=config, settings=settings,
                                            resume_id=ids.get(name)))
            sink.submit("log_params", params)
            group.sinks.append(sink)
        return group

    def log(self, record: Dict[str, Any]) -> None:
        """One metrics.jsonl record (non-finite values already None) to every tracker."""
        if self.sinks:
            metrics = numeric_metrics(record)
            step = int(record.get("step", 0))
            for sink in self.sinks:
                sink.submit("log_metrics", metrics, step)

    def close(self, end: RunEnd) -> None:
        """Hand every tracker the run's end; returns at once (``wait`` bounds the flush)."""
        for sink in self.sinks:
            sink.submit("finish", end)
            sink.stop()
        self._closed_at = time.monotonic()
        # A script that never closes its Trainer still gets the bounded flush, at interpreter exit (the sinks'
        # threads are daemons: without it their last calls would be cut off).
        atexit.register(self.wait)

    def wait(self) -> List[str]:
        """Let the trackers finish, for at most ``timeout_s`` since ``close`` in all; one warning per tracker left
        behind (logged, and returned)."""
        if self._closed_at is None:
            return []
        deadline = self._closed_at + self.timeout_s
        late = [note for sink in self.sinks if (note := sink.join(deadline - time.monotonic(), self.timeout_s))]
        for note in late:
            console_warning(note)
        self.sinks, self._closed_at = [], None
        atexit.unregister(self.wait)
        return late

    def _remember(self, name: str, run_id: str) -> None:
        """Keep a tracker's run id in the run directory (from the sink's thread), for the next attempt."""
        with self._lock:
            if self._ids.get(name) == run_id:
                return
            self._ids[name] = run_id
            tmp = self.run_dir / f".{IDS_FILE}.tmp"
            tmp.write_text(json.dumps(self._ids, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.run_dir / IDS_FILE)


class _LazyTracker(Tracker):
    """Imports the tracker's module in ``start``, on the sink's thread: a missing package warns there, once."""

    def __init__(self, name: str):
        self.name = name
        self.package = name
        self._inner: Optional[Tracker] = None

    def start(self, run: TrackerRun) -> Optional[str]:
        self._inner = build_tracker(self.name)
        return self._inner.start(run)

    def log_params(self, params: Dict[str, str]) -> None:
        self._inner.log_params(params)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self._inner.log_metrics(metrics, step)

    def finish(self, end: RunEnd) -> None:
        self._inner.finish(end)


__all__ = ["RunEnd", "Tracker", "TrackerRun", "Trackers", "TRACKERS", "tracker_names"]
