"""`distrain runs ls` on runs in every state, each produced for real: running, died (kill -9), preempted (a
preemption signal), failed (an exception inside the step)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import REPO, child_env, run_cli

LONG = ["configs/mlp.yaml", "train.steps=1000000", "train.log_every=5", "train.eval_every=0",
        "checkpoint.at_end=false", "metrics.progress=none"]

FAILING_STRATEGY = '''
from distrain.strategies.single import SingleStrategy


class FailsAtStep3(SingleStrategy):
    """A strategy whose optimizer step raises on the third call, as a user's code might."""

    calls = 0

    def step(self):
        FailsAtStep3.calls += 1
        if FailsAtStep3.calls == 3:
            raise RuntimeError("simulated failure inside the optimizer step")
        super().step()
'''


def _start(run_dir, name, extra=()):
    return subprocess.Popen([sys.executable, "-m", "distrain", "train", *LONG, f"run.name={name}",
                             f"run.dir={run_dir}", *extra], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_until_logging(run_dir, name, timeout=120):
    """Until the run has logged a step (it is in the loop, signal handlers installed)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / name / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} did not log a step within {timeout} s")


def _statuses(run_dir):
    proc = run_cli(["runs", "ls", str(run_dir), "--json"])
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in map(json.loads, proc.stdout.splitlines())}


def test_runs_ls_tells_running_died_preempted_and_failed_apart(tmp_path):
    killed, preempted = _start(tmp_path, "killed"), _start(tmp_path, "preempted")
    try:
        _wait_until_logging(tmp_path, "killed")
        _wait_until_logging(tmp_path, "preempted")
        rows = _statuses(tmp_path)
        assert rows["killed"]["status"] == "running" and rows["preempted"]["status"] == "running"
        assert rows["killed"]["step"] >= 5 and rows["killed"]["total_steps"] == 1000000

        killed.send_signal(signal.SIGKILL)  # no chance to write anything: run.json still says "running"
        killed.wait(timeout=30)
        preempted.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
        assert preempted.wait(timeout=120) == 0, preempted.stderr.read()[-3000:]
    finally:
        for proc in (killed, preempted):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"

    (tmp_path / "failing_strategy.py").write_text(FAILING_STRATEGY)
    failed = run_cli(["train", *LONG, "run.name=failed", f"run.dir={tmp_path}", "strategy.name=failing_strategy:FailsAtStep3"],
                     env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert failed.returncode == 1

    rows = _statuses(tmp_path)
    assert rows["killed"]["status"] == "died"
    assert rows["preempted"]["status"] == "preempted"
    assert rows["failed"]["status"] == "failed" and rows["failed"]["step"] == 2  # steps completed before it failed
    table = run_cli(["runs", "ls", str(tmp_path)]).stdout
    assert sorted(line.split()[1] for line in table.splitlines()[1:]) == ["died", "failed", "preempted"]


def test_runs_alone_lists_the_runs_in_runs_like_runs_ls(tmp_path):
    """`distrain runs` with no action used to exit 2 asking for one; it lists runs/ of the current directory."""
    proc = run_cli(["train", str(REPO / "configs" / "mlp.yaml"), "train.steps=2", "train.eval_every=0",
                    "metrics.progress=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone, ls = run_cli(["runs"], cwd=tmp_path), run_cli(["runs", "ls", "runs"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout == ls.stdout and alone.stdout.splitlines()[1].split()[:3] == ["mlp-digits", "finished", "2/2"]
