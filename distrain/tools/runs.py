"""Reading run directories back: metrics.jsonl, run.json and config.yaml, for `distrain runs ls` and `distrain plot`.

A run directory is what the trainer writes under ``run.dir/run.name``. Reading never writes: listing or plotting
a run that is still training is safe.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from distrain.errors import UsageError
from distrain.training.run_lock import process_alive
from distrain.telemetry.units import format_duration


@dataclass
class RunData:
    """One run's logged records: training steps and evaluations, in file order."""

    path: Path
    steps: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)  # run.json
    skipped_lines: int = 0  # unparsable lines (a run killed in the middle of writing one)

    @property
    def global_batch(self) -> Optional[int]:
        plan = self.info.get("plan") or {}
        if plan.get("global_batch"):
            return int(plan["global_batch"])
        for record in self.steps:
            if record.get("samples") and record.get("step"):
                return int(record["samples"] // record["step"])
        return None


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "run.json").is_file()


def read_run(path: Path) -> RunData:
    """Parse ``path/metrics.jsonl`` (and run.json when present); lines that do not parse are counted, not fatal."""
    data = RunData(path=path)
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                data.skipped_lines += 1
                continue
            if not isinstance(record, dict) or "step" not in record:
                data.skipped_lines += 1
            elif "loss" in record:
                data.steps.append(record)
            elif any(k.startswith("eval_") for k in record):
                data.evals.append(record)
    data.info = _read_json(path / "run.json")
    return data


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def expand_run_dirs(paths: List[str]) -> List[Path]:
    """The run directories named on the command line; a directory of runs (like runs/) stands for all of them."""
    out: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"Run directory '{raw}' does not exist. Pass the directory of a run (run.dir/run.name, "
                             f"e.g. runs/quickstart); `distrain runs ls` lists the runs in runs/.")
        if not path.is_dir():
            raise UsageError(f"'{raw}' is a file, not a run directory. Pass the directory that holds metrics.jsonl "
                             f"(e.g. runs/quickstart).")
        if is_run_dir(path):
            out.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not children:
            raise UsageError(f"'{raw}' is not a run directory (it has no metrics.jsonl or run.json) and holds none. "
                             f"Pass a run's directory, e.g. runs/quickstart, or a directory of runs, e.g. runs/.")
        out.extend(children)
    return out


def display_names(paths: List[Path]) -> List[str]:
    """Each run's name: its directory name, with as many parent names as it takes to tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# --- `distrain runs ls` ----------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    name: str
    status: str
    step: Optional[int]
    total_steps: Optional[int]
    world_size: Optional[int]
    strategy: Optional[str]
    final_loss: Optional[float]
    best_eval_loss: Optional[float]
    best_eval_accuracy: Optional[float]
    wall_s: Optional[float]
    started: Optional[float]
    # each rank's mean own step time (data + compute, no waiting for peers) over the logged steps; the rank that was
    # slowest most often (distrain.telemetry.stragglers; absent at one rank or with metrics.straggler_factor=0)
    step_s_ranks: Optional[List[float]] = None
    slowest_rank: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


def _config_value(path: Path, dotted: str) -> Any:
    """A value from the run's resolved config.yaml (None when it is missing or unreadable)."""
    try:
        return OmegaConf.select(OmegaConf.load(path / "config.yaml"), dotted)
    except Exception:  # a half-written or hand-edited file: the listing goes on without it
        return None


def summarize(run: RunData, name: str, hostname: Optional[str] = None) -> RunSummary:
    """One row of `distrain runs ls` from a run's files."""
    info = run.info
    status = str(info.get("status") or ("unknown" if run.steps else "empty"))
    started = info.get("started")
    if status == "running" and info.get("pid") and info.get("host") == (hostname or socket.gethostname()):
        if not process_alive(int(info["pid"]), started):
            status = "died"  # killed without a chance to write failed/preempted (kill -9, OOM killer, node reboot)
    last = run.steps[-1] if run.steps else {}
    final = info.get("final") or {}
    eval_losses = [r["eval_loss"] for r in run.evals if isinstance(r.get("eval_loss"), (int, float))]
    accuracies = [r["eval_accuracy"] for r in run.evals if isinstance(r.get("eval_accuracy"), (int, float))]
    if status in ("finished", "preempted") and final.get("wall_s") is not None and info.get("start_step", 0) == 0:
        wall = float(final["wall_s"])
    elif started:
        end = time.time() if status == "running" else _last_activity(run.path, info)
        wall = max(0.0, end - float(started))
    else:
        wall = None
    return RunSummary(
        name=name, status=status,
        step=last.get("step", info.get("step")),
        total_steps=_config_value(run.path, "train.steps"),
        world_size=info.get("world_size"),
        strategy=_config_value(run.path, "strategy.name"),
        final_loss=last.get("loss", final.get("loss")),
        best_eval_loss=min(eval_losses) if eval_losses else None,
        best_eval_accuracy=max(accuracies) if accuracies else None,
        wall_s=wall, started=started, **rank_times(run.steps),
    )


def rank_times(steps: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Each rank's mean ``step_s_ranks`` over the records that hold one, and the rank most often ``slowest_rank``."""
    rows = [r["step_s_ranks"] for r in steps if isinstance(r.get("step_s_ranks"), list) and r["step_s_ranks"]]
    rows = [row for row in rows if len(row) == len(rows[-1])]  # one world size: a resume may have changed it
    if not rows:
        return {}
    slowest = [r["slowest_rank"] for r in steps if isinstance(r.get("slowest_rank"), int)]
    return {"step_s_ranks": [sum(col) / len(col) for col in zip(*rows)],
            "slowest_rank": max(set(slowest), key=slowest.count) if slowest else None}


def format_rank_times(means: Optional[List[float]], slowest: Optional[int], shown: int = 4) -> str:
    """`distrain runs`' RANK STEP column: each rank's mean own step time in ms (up to ``shown`` ranks, else the
    median and the slowest), the rank slowest most often marked with *."""
    if not means:
        return "-"
    if len(means) <= shown:
        return " ".join(f"{1e3 * t:.1f}{'*' if r == slowest else ''}" for r, t in enumerate(means))
    median = sorted(means)[(len(means) - 1) // 2]
    top = max(range(len(means)), key=means.__getitem__)
    return f"median {1e3 * median:.1f}, rank {top} {1e3 * means[top]:.1f}"


def _last_activity(path: Path, info: Dict[str, Any]) -> float:
    times = [float(info.get("updated") or 0)]
    for name in ("metrics.jsonl", "run.json"):
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    return max(times)


def list_runs(directory: str) -> List[RunSummary]:
    """Every run directly under ``directory`` (a run.dir such as runs/), oldest first."""
    root = Path(directory)
    if not root.exists():
        raise UsageError(f"Directory '{directory}' does not exist. Pass the run.dir of your runs (default runs/), "
                         f"e.g. `distrain runs ls runs`.")
    if not root.is_dir():
        raise UsageError(f"'{directory}' is a file; pass a directory of runs (a run.dir such as runs/).")
    runs = [p for p in sorted(root.iterdir()) if p.is_dir() and is_run_dir(p)]
    if is_run_dir(root):  # `runs ls runs/quickstart`: that one run
        runs = [root]
    rows = [summarize(read_run(p), p.name) for p in runs]
    return sorted(rows, key=lambda r: (r.started or 0, r.name))


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)



def format_runs(rows: List[RunSummary]) -> str:
    """The table `distrain runs ls` prints."""
    header = ["RUN", "STATUS", "STEPS", "WORLD", "STRATEGY", "FINAL LOSS", "BEST EVAL LOSS", "BEST EVAL ACC", "WALL",
              "RANK STEP MS"]
    table = [header]
    for r in rows:
        steps = "-" if r.step is None else f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        table.append([r.name, r.status, steps, _fmt(r.world_size, "d"), r.strategy or "-", _fmt(r.final_loss, ".4f"),
                      _fmt(r.best_eval_loss, ".4f"),
                      "-" if r.best_eval_accuracy is None else f"{100 * r.best_eval_accuracy:.2f}%",
                      format_duration(r.wall_s), format_rank_times(r.step_s_ranks, r.slowest_rank)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
