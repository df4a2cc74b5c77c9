"""What every experiment tracker implements, and the sink that keeps a failing tracker away from training.

A tracker is one small class (``tensorboard.py``, ``mlflow.py``, ``wandb.py``) with four calls: ``start`` (open or
continue a tracker run; returns its id, which rank 0 keeps in the run directory), ``log_params``, ``log_metrics``
and ``finish``. ``TrackerSink`` runs them on a thread of their own: a slow or unreachable server never holds up a
step, and the first failure is reported once, after which that tracker is dropped and training goes on. At the
run's end ``stop`` returns at once and ``join`` bounds the flush, so rank 0 flushes after the last collective and no
other rank ever waits on a tracker.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from distrain.config.trajectory import flatten
from distrain.extras import install_hint
from distrain.telemetry.logs import get_logger


@dataclass
class TrackerRun:
    """What a tracker needs to open (or continue) its run."""

    run_dir: Path
    name: str  # run.name
    config: Dict[str, Any]  # the resolved config, nested
    settings: Dict[str, Any]  # this tracker's section of metrics.* (e.g. metrics.mlflow)
    resume_id: Optional[str] = None  # the tracker's own run id from an earlier attempt of this run


@dataclass
class RunEnd:
    """How the run ended, for ``Tracker.finish``."""

    status: str  # finished | failed | preempted
    config_file: Path  # the resolved config.yaml in the run directory
    checkpoint: Optional[Path] = None  # the newest committed checkpoint (what `distrain ckpt export` exports)


class Tracker:
    """One experiment tracker. Calls come from one thread, in order; any exception disables the tracker."""

    name = "base"
    package = ""  # the module to import; its absence is reported with the pip extra named after the tracker

    def start(self, run: TrackerRun) -> Optional[str]:
        """Open a new run, or continue ``run.resume_id``; returns the id to keep for a resumed run."""
        raise NotImplementedError

    def log_params(self, params: Dict[str, str]) -> None:
        """The resolved config, flattened to dotted keys with string values."""
        raise NotImplementedError

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """One metrics or eval record: numeric values only, lists already expanded to ``key/rankN``."""
        raise NotImplementedError

    def finish(self, end: RunEnd) -> None:
        """Attach the config and the checkpoint's location, mark the run's status, flush and close."""
        raise NotImplementedError


_STOP = object()


class TrackerSink:
    """Feeds one tracker from a queue on a daemon thread; the first failure warns once and disables it."""

    def __init__(self, tracker: Tracker, on_started: Callable[[str, str], None]):
        self.tracker = tracker
        self._on_started = on_started
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._failed = False
        self._doing: Optional[str] = None  # the call in progress, for the warning when it does not finish
        self._thread = threading.Thread(target=self._work, name=f"distrain-tracker-{tracker.name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> None:
        if not self._failed:
            self._queue.put((method, args))

    def stop(self) -> None:
        """No more calls: the thread ends once the queued ones are done (returns at once)."""
        self._queue.put(_STOP)

    def join(self, timeout_s: float, limit_s: float) -> Optional[str]:
        """Wait up to ``timeout_s`` for the queued calls; None when done, else a warning naming this tracker
        (``limit_s``: metrics.tracker_timeout_s, for the warning)."""
        self._thread.join(max(0.0, timeout_s))
        if not self._thread.is_alive():
            return None
        return (f"tracker {self.tracker.name} did not finish within metrics.tracker_timeout_s={limit_s:g} (still in "
                f"{self._doing or 'its queue'}: a slow or unreachable server?); it is left behind, so its last "
                f"records may be missing there. The run itself is complete, and metrics.jsonl has every record.")

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._failed:
                continue
            method, args = item
            self._doing = method
            try:
                result = getattr(self.tracker, method)(*args)
                if method == "start" and result:
                    self._on_started(self.tracker.name, str(result))
            except BaseException as err:  # a tracker never takes training down: report once, then drop it
                self._failed = True
                get_logger().warning(failure_message(self.tracker, method, err))


def failure_message(tracker: Tracker, method: str, err: BaseException) -> str:
    """One paragraph: which tracker, what it was doing, why, and that training goes on."""
    if isinstance(err, ImportError) and tracker.package and tracker.package in str(err):
        return (f"metrics.trackers lists {tracker.name}, but the {tracker.package} package is not installed: "
                f"{install_hint(tracker.package)}. Training goes on without it; metrics.jsonl has every "
                f"record.")
    detail = " ".join(str(err).split())[:300] or type(err).__name__
    return (f"tracker {tracker.name} failed in {method} ({type(err).__name__}: {detail}); it is switched off for "
            f"the rest of this run and training goes on. metrics.jsonl has every record.")


def flatten_params(tree: Dict[str, Any]) -> Dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: the resolved config as tracker parameters."""
    return {key: str(value) for key, value in flatten(tree).items()}


def numeric_metrics(record: Dict[str, Any]) -> Dict[str, float]:
    """The scalars of a metrics record, without ``step``; ``x_ranks: [a, b]`` becomes ``x_ranks/rank0``, ..."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, list) and key.endswith("_ranks"):
            for rank, item in enumerate(value):
                if _is_number(item):
                    out[f"{key}/rank{rank}"] = float(item)
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__: List[str] = ["RunEnd", "Tracker", "TrackerRun", "TrackerSink", "flatten_params", "numeric_metrics"]
