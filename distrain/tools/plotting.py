"""`distrain plot`: one PNG comparing runs - loss and eval against steps and samples, throughput, step time, and
per-rank step time when the runs logged it (several ranks, straggler tracking on).

matplotlib's Agg backend renders without a display (SSH sessions, SLURM nodes, CI). Each run keeps one colour in
every panel and is labelled with its directory name, so ddp vs fsdp vs local_sgd, or W=1 vs W=2, read at a glance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from distrain.errors import UsageError
from distrain.extras import import_optional
from distrain.tools.runs import RunData, display_names, expand_run_dirs, read_run


def _values(records: List[Dict[str, Any]], x: Callable[[Dict[str, Any]], Optional[float]], key: str):
    xs, ys = [], []
    for record in records:
        xv, yv = x(record), record.get(key)
        if xv is not None and isinstance(yv, (int, float)) and math.isfinite(yv):
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def default_out(paths: Sequence[str]) -> Path:
    """Where a plot goes without --out: into the run directory (or directory of runs) given, or the directory that
    holds all those given; never the current directory by chance."""
    try:
        common = os.path.commonpath(list(paths))
    except ValueError:  # absolute and relative paths mixed
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return Path(common or paths[0]) / "plot.png"


def plot_runs(paths: Sequence[str], out: Optional[str] = None, title: Optional[str] = None) -> Tuple[Path, List[str]]:
    """Render the comparison of the runs in ``paths`` (run directories, or directories of runs) to ``out`` (default:
    ``default_out``); returns the image's path and the run names its legends use."""
    run_dirs = expand_run_dirs(list(paths))
    out = str(out or default_out(paths))
    runs = [read_run(p) for p in run_dirs]
    empty = [str(r.path) for r in runs if not r.steps]
    if empty:
        raise UsageError(f"Run director{'y' if len(empty) == 1 else 'ies'} {', '.join(empty)} ha{'s' if len(empty) == 1 else 've'} "
                         f"no logged training steps in metrics.jsonl yet (a run logs every train.log_every steps). "
                         f"Plot it after its first log step, or leave it out.")
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UsageError(f"--out {out}: the directory '{out_path.parent}' does not exist. Create it or choose "
                         f"another path.")


    import_optional("matplotlib", "distrain plot").use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt  # lazy: optional: matplotlib is optional (distrain[viz])

    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = out_path.suffix.lstrip(".").lower()
    if suffix not in supported:
        raise UsageError(f"--out {out}: unknown image format {suffix or '(no extension)'!r}. Use one of "
                         f"{', '.join(sorted(supported))}, e.g. --out runs.png.")

    names = display_names(run_dirs)
    fig = build_figure(runs, names, title)
    try:
        fig.savefig(out_path, dpi=100)
    except OSError as err:
        raise UsageError(f"--out {out} cannot be written: {err.strerror or err}. Choose a writable path.") from None
    finally:
        plt.close(fig)
    return out_path, names


def build_figure(runs: List[RunData], names: List[str], title: Optional[str] = None):
    """The 2x3 comparison figure (a matplotlib Figure; the caller saves and closes it)."""
    import matplotlib  # lazy: optional: matplotlib is optional (distrain[viz])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional: matplotlib is optional (distrain[viz])

    # a third row, per rank, for runs that logged every rank's own step time (distrain.telemetry.stragglers)
    ranked = any(isinstance(r.get("step_s_ranks"), list) for run in runs for r in run.steps)
    fig, axes = plt.subplots(3 if ranked else 2, 3, figsize=(18, 14 if ranked else 9.5), constrained_layout=True)
    # Accuracy (a fraction) and loss (nats) share no scale: accuracy gets its own axis, on the right.
    has_accuracy = any(_values(run.evals, lambda r: r.get("step"), "eval_accuracy")[0] for run in runs)
    accuracy = axes[0, 2].twinx() if has_accuracy else None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, name) in enumerate(zip(runs, names)):
        # Earlier runs draw wider, so a run that retraces another exactly (W=1 vs W=2) still shows underneath.
        with plt.rc_context({"lines.linewidth": max(1.0, 3.0 - 0.6 * i)}):
            _plot_run(axes, accuracy, run, name, colours[i % len(colours)])
    _decorate(axes, accuracy, runs)
    fig.suptitle(title or f"distrain: {', '.join(names)}", fontsize=13)
    return fig


def _line(ax, points: Tuple[List[float], List[float]], **style: Any) -> None:
    """One series, or nothing when it was never logged (every value null): no legend entry for an empty line."""
    if points[0]:
        ax.plot(*points, **style)


def _plot_run(axes, accuracy, run: RunData, name: str, colour: str) -> None:
    batch = run.global_batch
    step_x = lambda r: r.get("step")  # noqa: E731
    samples_x = lambda r: r.get("samples") or (r["step"] * batch if batch else None)  # noqa: E731
    lm = any("tokens_per_s" in r for r in run.steps)

    for ax, x in ((axes[0, 0], step_x), (axes[0, 1], samples_x)):
        _line(ax, _values(run.steps, x, "loss"), color=colour, label=f"{name} train")
        _line(ax, _values(run.evals, x, "eval_loss"), color=colour, linestyle="--", marker="o", markersize=4,
              label=f"{name} eval")
    _line(axes[0, 2], _values(run.evals, step_x, "eval_loss"), color=colour, linestyle="--", marker="o",
          markersize=4, label=f"{name} eval loss")
    if accuracy is not None:
        _line(accuracy, _values(run.evals, step_x, "eval_accuracy"), color=colour, marker="s", markersize=4,
              label=f"{name} accuracy")
    rate = "tokens_per_s" if lm else "samples_per_s"
    _line(axes[1, 0], _values(run.steps, step_x, rate), color=colour, label=f"{name} ({rate.replace('_per_s', '/s')})")
    ax = axes[1, 1]
    _line(ax, _values(run.steps, step_x, "compute_s"), color=colour, label=f"{name} compute")
    _line(ax, _values(run.steps, step_x, "comm_s"), color=colour, linestyle=":", label=f"{name} exposed comm")
    if not any(isinstance(r.get("compute_s"), (int, float)) for r in run.steps):
        _line(ax, _values(run.steps, step_x, "step_time_s"), color=colour, label=f"{name} step time")
    _line(axes[1, 2], _values(run.steps, step_x, "grad_norm"), color=colour, label=name)
    if len(axes) > 2:
        _plot_ranks(axes[2], run, name, colour)


def _plot_ranks(axes, run: RunData, name: str, colour: str) -> None:
    """Every rank's own step time and data time (one line style per rank), and the slowest rank's lag."""
    styles = ["-", "--", ":", "-."]
    ranks = max((len(r["step_s_ranks"]) for r in run.steps if isinstance(r.get("step_s_ranks"), list)), default=0)
    for rank in range(ranks):
        label = f"{name} rank {rank}" if ranks <= len(styles) else (name if rank == 0 else None)
        for ax, key in ((axes[0], "step_s_ranks"), (axes[1], "data_s_ranks")):
            points = ([r["step"] for r in run.steps if len(r.get(key) or ()) > rank],
                      [r[key][rank] for r in run.steps if len(r.get(key) or ()) > rank])
            _line(ax, points, color=colour, linestyle=styles[rank % len(styles)], label=label)
    _line(axes[2], _values(run.steps, lambda r: r.get("step"), "slowest_rank_lag"), color=colour, label=name)


def _decorate(axes, accuracy, runs: List[RunData]) -> None:
    titles = [["loss vs step", "loss vs samples seen", "evaluation vs step"],
              ["throughput", "step time (measured on log steps)", "gradient norm"],
              ["per-rank step time (data + compute, no waiting)", "per-rank data time", "slowest rank / median rank"]]
    xlabels = [["step", "samples", "step"], ["step", "step", "step"], ["step", "step", "step"]]
    ylabels = [["loss", "loss", "eval loss"], ["per second (global)", "seconds", "L2 norm"],
               ["seconds", "seconds", "ratio"]]
    losses = [r["loss"] for run in runs for r in run.steps if isinstance(r.get("loss"), (int, float))]
    for row in range(len(axes)):
        for col in range(3):
            ax = axes[row, col]
            ax.set_title(titles[row][col])
            ax.set_xlabel(xlabels[row][col])
            ax.set_ylabel(ylabels[row][col])
            ax.grid(True, alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            if accuracy is not None and ax is axes[0, 2]:  # one legend for both axes of the evaluation panel
                more = accuracy.get_legend_handles_labels()
                handles, labels = handles + more[0], labels + more[1]
            if handles:
                ax.legend(handles, labels, fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    if accuracy is not None:
        accuracy.set_ylabel("eval accuracy")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:  # losses spanning decades read better in log
        axes[0, 0].set_yscale("log")
        axes[0, 1].set_yscale("log")
