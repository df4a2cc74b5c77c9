"""`distrain plot`: one PNG comparing runs - loss and eval against steps and samples, throughput, step time.

matplotlib's Agg backend renders without a display (SSH sessions, SLURM nodes, CI). Each run keeps one colour in
every panel and is labelled with its directory name, so ddp vs fsdp vs local_sgd, or W=1 vs W=2, read at a glance.
"""

from __future__ import annotations

import math
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


def plot_runs(paths: Sequence[str], out: str, title: Optional[str] = None) -> Tuple[Path, List[str]]:
    """Render the comparison of the runs in ``paths`` (run directories, or directories of runs) to ``out``;
    returns the image's path and the run names its legends use."""
    run_dirs = expand_run_dirs(list(paths))
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

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, name) in enumerate(zip(runs, names)):
        # Earlier runs draw wider, so a run that retraces another exactly (W=1 vs W=2) still shows underneath.
        with plt.rc_context({"lines.linewidth": max(1.0, 3.0 - 0.6 * i)}):
            _plot_run(axes, run, name, colours[i % len(colours)])
    _decorate(axes, runs)
    fig.suptitle(title or f"distrain: {', '.join(names)}", fontsize=13)
    return fig


def _plot_run(axes, run: RunData, name: str, colour: str) -> None:
    batch = run.global_batch
    step_x = lambda r: r.get("step")  # noqa: E731
    samples_x = lambda r: r.get("samples") or (r["step"] * batch if batch else None)  # noqa: E731
    lm = any("tokens_per_s" in r for r in run.steps)

    ax = axes[0, 0]
    ax.plot(*_values(run.steps, step_x, "loss"), color=colour, label=f"{name} train")
    ax.plot(*_values(run.evals, step_x, "eval_loss"), color=colour, linestyle="--", marker="o", markersize=4,
            label=f"{name} eval")
    ax = axes[0, 1]
    ax.plot(*_values(run.steps, samples_x, "loss"), color=colour, label=f"{name} train")
    ax.plot(*_values(run.evals, samples_x, "eval_loss"), color=colour, linestyle="--", marker="o", markersize=4,
            label=f"{name} eval")
    ax = axes[0, 2]
    metric = "eval_accuracy" if any("eval_accuracy" in r for r in run.evals) else "eval_loss"
    ax.plot(*_values(run.evals, step_x, metric), color=colour, marker="o", markersize=4,
            label=f"{name} ({metric.removeprefix('eval_')})")
    ax = axes[1, 0]
    rate = "tokens_per_s" if lm else "samples_per_s"
    ax.plot(*_values(run.steps, step_x, rate), color=colour, label=f"{name} ({rate.replace('_per_s', '/s')})")
    ax = axes[1, 1]
    ax.plot(*_values(run.steps, step_x, "compute_s"), color=colour, label=f"{name} compute")
    ax.plot(*_values(run.steps, step_x, "comm_s"), color=colour, linestyle=":", label=f"{name} exposed comm")
    if not any(isinstance(r.get("compute_s"), (int, float)) for r in run.steps):
        ax.plot(*_values(run.steps, step_x, "step_time_s"), color=colour, label=f"{name} step time")
    ax = axes[1, 2]
    ax.plot(*_values(run.steps, step_x, "grad_norm"), color=colour, label=name)


def _decorate(axes, runs: List[RunData]) -> None:
    titles = [["loss vs step", "loss vs samples seen", "evaluation vs step"],
              ["throughput", "step time (measured on log steps)", "gradient norm"]]
    xlabels = [["step", "samples", "step"], ["step", "step", "step"]]
    ylabels = [["loss", "loss", "eval accuracy / loss"], ["per second (global)", "seconds", "L2 norm"]]
    losses = [r["loss"] for run in runs for r in run.steps if isinstance(r.get("loss"), (int, float))]
    for row in range(2):
        for col in range(3):
            ax = axes[row, col]
            ax.set_title(titles[row][col])
            ax.set_xlabel(xlabels[row][col])
            ax.set_ylabel(ylabels[row][col])
            ax.grid(True, alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:  # losses spanning decades read better in log
        axes[0, 0].set_yscale("log")
        axes[0, 1].set_yscale("log")
