"""Which rank holds the others back (distrain.telemetry.stragglers): every rank's own data and compute time on log
steps, slowest_rank in metrics.jsonl, one warning per lagging rank, and `distrain runs` / `plot` per rank.

The real runs put a slow dataset on rank 1 (tests/workers/slow_data.py: 40 ms of sleep per micro-batch fetch) of a
2-rank gloo job, and the same job without the sleep."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import read_jsonl, run_cli_here, run_torchrun
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.telemetry.logs import get_logger
from distrain.telemetry.perf import StepTimer
from distrain.telemetry.stragglers import StragglerTracker
from distrain.telemetry.trackers.base import numeric_metrics
from distrain.tools.plotting import build_figure
from distrain.tools.runs import format_runs, list_runs, read_run


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = _Warnings()
    get_logger().addHandler(handler)
    yield handler.messages
    get_logger().removeHandler(handler)


def test_a_rank_slow_for_the_window_is_warned_about_once_with_its_host_and_phase(warnings):
    tracker = StragglerTracker(factor=1.5, window=3, world_size=3)
    # (data_s, compute_s, wait_s) per rank: rank 2 fetches 40 ms longer, the others wait for it
    slow = [[0.001, 0.010, 0.040], [0.001, 0.011, 0.039], [0.041, 0.010, 0.0]]
    records = [tracker.fields(step, slow) for step in range(1, 7)]
    assert all(r["slowest_rank"] == 2 and r["slowest_phase"] == "data" for r in records)
    assert records[0]["step_s_ranks"] == pytest.approx([0.011, 0.012, 0.051])
    assert records[0]["slowest_rank_lag"] == pytest.approx(0.051 / 0.012, rel=1e-3)
    assert len(warnings) == 1  # after the third log step in a row, and never again
    scalars = numeric_metrics(records[0])  # the trackers: one curve per rank, like peak_mem_mb_ranks
    assert scalars["step_s_ranks/rank2"] == pytest.approx(0.051) and scalars["wait_s_ranks/rank0"] == 0.040
    assert "rank 2 on host " in warnings[0] and "slow phase is data" in warnings[0] and "3 log steps" in warnings[0]
    # a compute straggler elsewhere is its own warning, naming compute
    tracker.fields(7, [[0.001, 0.030, 0.0], [0.001, 0.010, 0.02], [0.001, 0.010, 0.02]])
    assert len(warnings) == 1
    for step in (8, 9):
        tracker.fields(step, [[0.001, 0.030, 0.0], [0.001, 0.010, 0.02], [0.001, 0.010, 0.02]])
    assert len(warnings) == 2 and "rank 0 on host" in warnings[1] and "slow phase is compute" in warnings[1]


def test_a_lag_must_last_the_window_in_a_row(warnings):
    tracker = StragglerTracker(factor=1.5, window=3, world_size=2)
    slow, even = [[0.0, 0.010, 0.03], [0.03, 0.010, 0.0]], [[0.0, 0.010, 0.0], [0.0, 0.011, 0.0]]
    for rows in (slow, slow, even, slow, slow, even, even):
        record = tracker.fields(1, rows)
    assert not warnings and record["slowest_rank_lag"] == pytest.approx(1.1)
    # at 2 ranks the slower is compared with the faster one (the mean of the two would hide half the lag)
    assert tracker.fields(1, slow)["slowest_rank_lag"] == pytest.approx(4.0)


@pytest.mark.parametrize("factor, world", [(0.0, 4), (1.5, 1)])
def test_tracking_is_off_at_factor_zero_or_one_rank(factor, world):
    assert not StragglerTracker(factor=factor, window=3, world_size=world).enabled


def test_own_times_leave_the_wait_for_peers_out_of_compute():
    timer = StepTimer(torch.device("cpu"))
    timer.begin(True)
    with timer.phase("data"):
        time.sleep(0.02)
    for seconds in (0.01, 0.01, 0.11):  # the last micro-step waits 100 ms for a slower rank in the gradient sync
        with timer.phase("micro"):
            time.sleep(seconds)
    data, compute, wait = timer.own_times(world_size=2)
    first, second, last = timer.micro
    assert data == timer.phases["data"] >= 0.02
    assert wait == pytest.approx(last - (first + second) / 2) and wait > 0.05  # sleeps overshoot on a busy machine
    assert compute == pytest.approx(first + second + last - wait)
    assert timer.split(2)["compute_s"] == pytest.approx(compute)


@pytest.mark.parametrize("override, says", [("metrics.straggler_factor=1", "greater than 1"),
                                            ("metrics.straggler_factor=-2", "greater than 1"),
                                            ("metrics.straggler_window=0", "at least 1")])
def test_bad_straggler_settings_are_one_paragraph_and_exit_2(override, says, repo, capsys):
    with pytest.raises(ConfigError, match=says):
        load_config(repo / "configs" / "mlp.yaml", [override])
    code, _, err = run_cli_here(["config", "show", repo / "configs" / "mlp.yaml", override], capsys)
    paragraph = " ".join(err.split())  # the console wraps it
    assert code == 2 and override.split("=")[0] in paragraph and says in paragraph and "Traceback" not in err


def _write_run(path: Path, rows: List[List[float]]) -> None:
    path.mkdir(parents=True)
    records = [{"step": i + 1, "loss": 1.0, "samples": 64 * (i + 1), "step_s_ranks": row,
                "slowest_rank": max(range(len(row)), key=row.__getitem__)} for i, row in enumerate(rows)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_runs_and_plot_show_each_ranks_step_time(tmp_path):
    _write_run(tmp_path / "runs" / "two", [[0.010, 0.050], [0.012, 0.054]])
    _write_run(tmp_path / "runs" / "six", [[0.010, 0.011, 0.012, 0.013, 0.050, 0.011]])
    table = format_runs(list_runs(str(tmp_path / "runs")))
    assert "RANK STEP MS" in table and "11.0 52.0*" in table and "median 11.0, rank 4 50.0" in table
    fig = build_figure([read_run(tmp_path / "runs" / "two")], ["two"])
    assert len(fig.axes) == 9  # the third row: per-rank step time, data time, slowest / median
    assert {line.get_label() for line in fig.axes[6].get_lines()} == {"two rank 0", "two rank 1"}


def _train(tmp_path: Path, name: str, delay_s: float):
    proc = run_torchrun(2, ["-m", "distrain", "train", "configs/mlp.yaml", "data.name=slow_data:slow_digits",
                            f"data.kwargs.delay_s={delay_s}", "data.num_workers=0", "train.steps=30",
                            "train.log_every=1", "train.eval_every=0", "checkpoint.at_end=false",
                            "metrics.progress=none", f"run.dir={tmp_path}", f"run.name={name}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]  # not the final eval's
    return records, proc.stderr


@pytest.mark.slow
def test_a_slow_data_fetch_on_rank_1_is_found_and_an_even_job_is_not_flagged(tmp_path, capsys):
    # 2 real ranks on gloo, 30 steps each, every step logged; accumulation 1, so the wait for rank 1's data must be
    # told apart from compute by the log step's timed wait (it would otherwise sit inside rank 0's backward)
    records, stderr = _train(tmp_path, "slow", delay_s=0.04)
    slowest = [r["slowest_rank"] for r in records]
    assert slowest.count(1) >= 0.8 * len(records), slowest
    assert sum(r["data_s_ranks"][1] >= 0.04 for r in records) >= 0.8 * len(records)
    warned = [line for line in stderr.splitlines() if "straggler" in line]
    assert len(warned) == 1 and "rank 1 on host" in warned[0] and "slow phase is data" in warned[0], stderr[-3000:]

    records, stderr = _train(tmp_path, "even", delay_s=0.0)
    assert len(records) == 30 and all(len(r["step_s_ranks"]) == 2 for r in records)
    assert "straggler" not in stderr, stderr[-3000:]

    code, out, _ = run_cli_here(["runs", "ls", tmp_path], capsys)  # each rank's mean step time; the slow one marked
    assert code == 0 and next(line for line in out.splitlines() if line.startswith("slow ")).endswith("*")
    code, out, _ = run_cli_here(["plot", tmp_path / "slow", tmp_path / "even", "--out", tmp_path / "p.png"], capsys)
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0
