"""Comparing runs: `distrain plot` (a headless PNG) and `distrain runs ls`, on two real quickstart runs (W=1, W=2)."""

from __future__ import annotations

import json

import pytest

from conftest import read_jsonl, run_cli

QUICK = ["configs/quickstart.yaml", "train.steps=40", "train.eval_every=20", "train.log_every=10",
         "checkpoint.at_end=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    one = run_cli(["train", *QUICK, "run.name=w1", f"run.dir={runs}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["launch", "--nproc-per-node", "2", *QUICK, "run.name=w2", "train.micro_batch=16", f"run.dir={runs}"])
    assert two.returncode == 0, two.stderr[-3000:]
    return runs


def test_plot_writes_a_png_comparing_both_runs(two_runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "runs.png"
    proc = run_cli(["plot", str(two_runs / "w1"), str(two_runs / "w2"), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "w1, w2" in proc.stdout and "Traceback" not in proc.stderr
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (1400, 1800)  # three rows: w2's ranks logged their own step times
    assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas


def test_figure_labels_both_runs_and_draws_their_logged_values(two_runs):
    from distrain.tools.plotting import build_figure
    from distrain.tools.runs import read_run

    runs = [read_run(two_runs / "w1"), read_run(two_runs / "w2")]
    fig = build_figure(runs, ["w1", "w2"])
    loss_vs_step, loss_vs_samples, evaluation = fig.axes[0], fig.axes[1], fig.axes[2]
    labels = loss_vs_step.get_legend().get_texts()
    assert [t.get_text() for t in labels] == ["w1 train", "w1 eval", "w2 train", "w2 eval"]
    for line, run in zip(loss_vs_step.get_lines()[::2], ("w1", "w2")):
        records = [r for r in read_jsonl(two_runs / run / "metrics.jsonl") if "loss" in r]
        assert list(line.get_xdata()) == [r["step"] for r in records]
        assert list(line.get_ydata()) == [r["loss"] for r in records]
    assert list(loss_vs_samples.get_lines()[0].get_xdata()) == [640, 1280, 1920, 2560]  # 64 samples per step
    assert [t.get_text() for t in evaluation.get_legend().get_texts()] == [
        "w1 eval loss", "w2 eval loss", "w1 accuracy", "w2 accuracy"]


def test_accuracy_has_its_own_axis_and_series_never_logged_have_no_legend_entry(two_runs, tmp_path):
    """Accuracy (0.9x) and eval loss (0.0x) on one axis flattened both; compute_s and comm_s are null on every log
    step of a run with one micro-step per step on several ranks (the quickstart), and their legend entries pointed
    at lines that were not there. w2 without accumulation: w2's records with the split null, as such a run logs."""
    import shutil

    from distrain.tools.plotting import build_figure
    from distrain.tools.runs import read_run

    shutil.copytree(two_runs / "w2", tmp_path / "w2")
    records = read_jsonl(tmp_path / "w2" / "metrics.jsonl")
    (tmp_path / "w2" / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "compute_s": None, "comm_s": None} if "loss" in r else r) + "\n" for r in records))
    runs = [read_run(two_runs / "w1"), read_run(tmp_path / "w2")]
    fig = build_figure(runs, ["w1", "w2"])
    evaluation = fig.axes[2]
    accuracy = next(ax for ax in fig.axes if ax.get_ylabel() == "eval accuracy")
    assert accuracy.get_shared_x_axes().joined(accuracy, evaluation) and accuracy.get_ylabel() == "eval accuracy"
    for run, loss, acc in zip((two_runs / "w1", tmp_path / "w2"), evaluation.get_lines(), accuracy.get_lines()):
        evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_accuracy" in r]
        assert list(loss.get_ydata()) == [r["eval_loss"] for r in evals]  # the eval losses, on the left
        assert list(acc.get_ydata()) == [r["eval_accuracy"] for r in evals]  # the accuracies, on the right
    names = {"compute_s": "compute", "comm_s": "exposed comm"}
    never = [f"{run.name} {names[key]}" for run in (two_runs / "w1", tmp_path / "w2") for key in names
             if all(r.get(key) is None for r in read_jsonl(run / "metrics.jsonl") if "loss" in r)]
    assert never, "this test needs a series a run never logged"
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert not set(never) & set(labels), labels
    assert all(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())


def test_plot_without_out_writes_into_the_run_directory_not_the_current_one(two_runs, tmp_path):
    proc = run_cli(["plot", str(two_runs / "w1")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {two_runs / 'w1' / 'plot.png'} " in proc.stdout
    assert (two_runs / "w1" / "plot.png").stat().st_size > 0 and list(tmp_path.iterdir()) == []
    both = run_cli(["plot", str(two_runs / "w1"), str(two_runs / "w2")], cwd=tmp_path)
    assert both.returncode == 0 and f"wrote {two_runs / 'plot.png'} " in both.stdout
    assert list(tmp_path.iterdir()) == []


def test_plot_accepts_a_directory_of_runs(two_runs, tmp_path):
    proc = run_cli(["plot", str(two_runs), "--out", str(tmp_path / "all.svg")])
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s): w1, w2" in proc.stdout
    assert (tmp_path / "all.svg").read_text().lstrip().startswith("<?xml")


def test_runs_ls_summarises_finished_runs(two_runs):
    proc = run_cli(["runs", "ls", str(two_runs)])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATUS", "STEPS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["w1"][1:5] == ["finished", "40/40", "1", "ddp"] and rows["w2"][1:5] == ["finished", "40/40", "2", "ddp"]
    # RANK STEP MS: each rank's own step time at 2 ranks (the one most often slowest marked *), none at one rank
    assert rows["w1"][-1] == "-" and len(rows["w2"]) == len(rows["w1"]) + 1 and "*" in " ".join(rows["w2"][-2:])
    as_json = [json.loads(line) for line in run_cli(["runs", "ls", str(two_runs), "--json"]).stdout.splitlines()]
    for row in as_json:
        records = read_jsonl(two_runs / row["name"] / "metrics.jsonl")
        assert row["final_loss"] == [r for r in records if "loss" in r][-1]["loss"]
        assert row["best_eval_loss"] == min(r["eval_loss"] for r in records if "eval_loss" in r)
        assert row["wall_s"] > 0


def test_plot_without_matplotlib_names_the_extra_that_installs_it(two_runs, tmp_path, capsys, monkeypatch):
    import sys

    from conftest import run_cli_here

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when it is not installed
    code, _, err = run_cli_here(["plot", two_runs / "w1", "--out", tmp_path / "runs.png"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "distrain plot needs matplotlib" in err and "pip install 'distrain[viz]'" in " ".join(err.split())
