"""Faults, with real gloo workers under `distrain launch` (torch's elastic agent), never mocks.

* a rank that stalls inside a step: the job fails within dist.timeout_s + 30 s, naming the rank and the
  collective, and no process is left behind;
* kill -9 of a worker under --max-restarts: the agent restarts the group, training resumes from the latest
  checkpoint and ends on exactly the parameters of an uninterrupted run;
* a preemption signal to one rank only: every rank stops after the same step, a checkpoint is committed,
  run.json says "preempted", and the next launch resumes to the same final parameters;
* the stop agreement behind it is lagged a step (torchrun, 2 ranks): no rank waits for a slower one at a step
  boundary, and both read the same stop one boundary after the signal.

The workers run the quickstart config (shortened) with ``fault_helpers:FaultDDP``, which injects the faults.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest

from conftest import run_torchrun
from distrain.config import load_config
from distrain.errors import ConfigError
from fault_helpers import (DELAY_ENV, FAST, KILL_ENV, PYTHON, QUICKSTART, REPO, STALL_ENV, launch_command,
                           load_weights, max_rel_diff, processes_mentioning, run_json, steps_logged, wait_until,
                           worker_env)
from stop_agreement_worker import BEHIND_S, SIGNAL_AT

STEPS = 20
TOLERANCE = 1e-5  # fp32, relative; resumes here are in fact bit-exact


def run(cmd: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Final weights of an uninterrupted 2-worker run: what every faulted run must end on."""
    root = tmp_path_factory.mktemp("reference")
    proc = run(launch_command(2, root / "runs"), worker_env(root / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_weights(root / "out", STEPS)


def test_faults_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="faults.signals"):
        load_config(QUICKSTART, ["faults.signals=[USR1,KILL]"])
    with pytest.raises(ConfigError, match="faults.requeue_signals"):
        load_config(QUICKSTART, ["faults.signals=[TERM]", "faults.requeue_signals=[USR1]"])
    cfg = load_config(QUICKSTART, ["faults.signals=[sigusr2,TERM]", "faults.requeue_signals=[USR2]"])
    assert list(cfg.faults.signals) == ["sigusr2", "TERM"]


def test_a_stalled_rank_is_named_and_no_process_is_left(tmp_path):
    timeout_s = 5
    run_dir = tmp_path / "runs"
    cmd = launch_command(3, run_dir, ["train.global_batch=48", "train.micro_batch=16", f"dist.timeout_s={timeout_s}"])
    proc = subprocess.Popen(cmd, env=worker_env(tmp_path / "out", **{STALL_ENV: "2:3"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: steps_logged(run_dir) >= 2, 240, "step 2", proc)
        stalled_at = time.monotonic()  # rank 2 enters step 3 and sleeps there from now on
        output, _ = proc.communicate(timeout=timeout_s + 90)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - stalled_at
    print(f"stall -> job failed in {took:.1f} s (dist.timeout_s={timeout_s})")
    assert proc.returncode == 1, output[-3000:]
    assert took <= timeout_s + 30, f"the job took {took:.1f} s to fail after the stall"
    report = [line for line in output.splitlines() if line.startswith("distrain: error: worker rank")]
    assert report, output[-3000:]
    assert re.search(r"worker rank [01] failed first", report[0]), report[0]  # a waiting rank saw it first
    for needed in ("rank 2 did not arrive", "in step 3", f"timed out after dist.timeout_s={timeout_s}", "gloo:"):
        assert needed in report[0], f"{needed!r} missing from: {report[0]}"
    logs = run_dir / "quickstart" / "logs"
    assert "rank 2 did not arrive" in (logs / "rank0.log").read_text()
    # its own log says why it ended: told by a peer through the store, or stuck past the timeout when torchrun's
    # SIGTERM arrived (the store's host, rank 0, may already be gone)
    assert re.search(r"rank 2 is stopping because (rank|it has been stuck in step 3)", (logs / "rank2.log").read_text())
    assert run_json(run_dir)["status"] == "failed"
    assert processes_mentioning(str(run_dir)) == [], "worker processes outlived the job"


def test_a_killed_worker_is_restarted_and_resumes_exactly(tmp_path, reference):
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    proc = run(launch_command(2, run_dir, ["checkpoint.every=5"], ["--max-restarts", "1"]),
               worker_env(out, **{KILL_ENV: "1:12"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = max_rel_diff(reference, load_weights(out, STEPS))
    print(f"kill -9 of rank 1 in step 12, restart, resume from step 10: max relative difference {diff:.3e}")
    assert diff <= TOLERANCE
    attempts = run_json(run_dir)["attempts"]
    assert [(a["start_step"], a["torchelastic_restart_count"]) for a in attempts] == [(0, 0), (10, 1)]
    assert "step_00000010" in (run_dir / "quickstart" / "logs" / "rank1.log").read_text()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, reference):
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    cmd = launch_command(2, run_dir)
    proc = subprocess.Popen(cmd, env=worker_env(out, **{DELAY_ENV: "0.1"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: steps_logged(run_dir) >= 4, 240, "step 4", proc)
        os.kill(int((out / "pid.rank1").read_text()), signal.SIGUSR1)  # rank 1 only: rank 0 must follow it
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    record = run_json(run_dir)
    stopped = record["step"]
    assert record["status"] == "preempted" and 4 <= stopped < 20, record
    logs = run_dir / "quickstart" / "logs"
    assert f"stopping after step {stopped} for preemption: this rank received SIGUSR1" in (logs / "rank1.log").read_text()
    rank0 = (logs / "rank0.log").read_text()
    assert f"stopping after step {stopped} for preemption: another rank was signalled" in rank0
    assert f"saved step {stopped} (preempted)" in rank0 and "requeue" not in rank0  # not under SLURM: no requeue

    resumed = run(cmd, worker_env(out))  # a plain relaunch picks the run up (train.resume=auto)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_json(run_dir)["attempts"][-1]["start_step"] == stopped
    diff = max_rel_diff(reference, load_weights(out, STEPS))
    print(f"SIGUSR1 to rank 1, stop at step {stopped}, resume: max relative difference {diff:.3e}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_the_stop_agreement_waits_for_no_rank_and_every_rank_stops_at_the_same_step(tmp_path):
    proc = run_torchrun(2, ["tests/workers/stop_agreement_worker.py", str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    slow, quick = zip(*((r["slow"], r["quick"]) for r in
                        (json.loads((tmp_path / f"agree-rank{rank}.json").read_text()) for rank in range(2))))
    print("slow steps: seconds per agreement on rank 0:", [f"{s:.3f}" for s in slow[0]["seconds"]],
          "; quick steps: stopped", [r["stopped"] for r in quick], "agreements started", [r["started"] for r in quick])
    # slow steps (rank 1's second step takes BEHIND_S, more than AGREE_EVERY_S): the agreement is read as soon as it
    # is started, so the signal rank 1 got in its second step is acted on by every rank right after that step
    assert [r["codes"][:2] for r in slow] == [[0, 1], [0, 1]], slow
    # quick steps: both stop after the same step, within two agreements' spacing of the signal (about 2 x 0.25 s,
    # i.e. 100 steps of 5 ms; allow for a loaded machine), and agree far less often than once per step
    assert quick[0]["stopped"] == quick[1]["stopped"], quick
    assert SIGNAL_AT < quick[0]["stopped"] < SIGNAL_AT + 300, quick
    assert quick[0]["started"] < quick[0]["stopped"] / 2, quick
    assert not any(r["in_flight"] for r in slow + quick)  # a stop starts no further agreement


@pytest.mark.slow
def test_kill9_at_five_random_steps_every_run_completes_exactly(tmp_path, reference):
    seed = 20261124
    rng = random.Random(seed)
    cases = [(rng.randrange(2), step) for step in sorted(rng.sample(range(2, STEPS + 1), 5))]
    print(f"seed {seed}: kill -9 (rank, step) = {cases}")
    failures = []
    for i, (rank, step) in enumerate(cases):
        run_dir, out = tmp_path / f"run{i}", tmp_path / f"out{i}"
        proc = run(launch_command(2, run_dir, ["checkpoint.every=4"], ["--max-restarts", "3"]),
                   worker_env(out, **{KILL_ENV: f"{rank}:{step}"}))
        if proc.returncode != 0:
            failures.append(f"rank {rank} step {step}: exit {proc.returncode}: {proc.stderr[-1500:]}")
            continue
        diff = max_rel_diff(reference, load_weights(out, STEPS))
        restarts = [a.get("torchelastic_restart_count") for a in run_json(run_dir)["attempts"]]
        print(f"  rank {rank} killed in step {step}: attempts {restarts}, max relative difference {diff:.3e}")
        if diff > TOLERANCE or restarts != [0, 1]:
            failures.append(f"rank {rank} step {step}: difference {diff:.3e}, attempts {restarts}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_local_cpu_script_restarts_after_a_kill(tmp_path, reference):
    """launch/local_cpu.sh: 2 CPU workers, MAX_RESTARTS=1; rank 0 is killed in step 9 and the group recovers."""
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    env = worker_env(out, **{KILL_ENV: "0:9"}, NPROC="2", MAX_RESTARTS="1", DISTRAIN_PYTHON=PYTHON)
    proc = run([str(REPO / "launch" / "local_cpu.sh"), *FAST, f"run.dir={run_dir}", "checkpoint.every=4"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_rel_diff(reference, load_weights(out, STEPS)) <= TOLERANCE
    assert [a["start_step"] for a in run_json(run_dir)["attempts"]] == [0, 8]
