"""SLURM for real: a one-host cluster (launch/slurm-local/start.sh), jobs submitted with sbatch, signals sent
with scancel, requeue done by the job itself. Marked ``slurm`` (run with ``-m slurm``; needs root to start the
daemons, and apt to install them the first time).

* `sbatch launch/slurm.sbatch` (srun mode, 2 tasks, gloo) trains the quickstart to completion, and
  `distrain slurm submit --mode torchrun` does the same with one torchrun per node;
* preemption round trip, in both modes: `scancel --signal=USR1` mid-run -> every rank stops after the same
  step, a checkpoint is committed -> the job requeues itself -> the rerun (SLURM_RESTART_COUNT=1) resumes
  from that checkpoint and ends on the parameters of an uninterrupted run.

`distrain slurm submit --dry-run` needs no cluster and runs in the default suite.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest

from conftest import REPO, run_cli
from fault_helpers import (DELAY_ENV, FAST, PYTHON, QUICKSTART, STEPS, load_weights, max_rel_diff, reference_weights,
                           run_json, steps_logged, wait_until, worker_env)

START, STOP = REPO / "launch" / "slurm-local" / "start.sh", REPO / "launch" / "slurm-local" / "stop.sh"
TOLERANCE = 1e-5


# --- no cluster needed -------------------------------------------------------------------------------------
def test_submit_dry_run_renders_the_template(tmp_path):
    proc = run_cli(["slurm", "submit", "configs/quickstart.yaml", "--nodes", "2", "--nproc-per-node", "4",
                    "--mode", "torchrun", "--gpus-per-node", "4", "--time", "01:00:00", "--dry-run",
                    "--", "--account=proj", "--qos", "normal", "train.micro_batch=8"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=01:00:00", "#SBATCH --job-name=quickstart", "#SBATCH --requeue",
                 "export DISTRAIN_SLURM_MODE=torchrun", "export DISTRAIN_NPROC_PER_NODE=4"):
        assert line in out.splitlines(), f"{line!r} not in the rendered script:\n{out}"
    assert "world size 8 (torchrun mode); global batch 64 = micro 8 x accum 1 x world 8" in out
    command = out.strip().splitlines()[-1]
    assert re.match(r"# sbatch --account=proj --qos normal '<rendered script>' \S+quickstart.yaml "
                    r"train.micro_batch=8$", command), command
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # what would be submitted is valid shell


def test_submit_checks_the_world_size_before_queueing():
    proc = run_cli(["slurm", "submit", "configs/quickstart.yaml", "--nodes", "3", "--nproc-per-node", "1",
                    "--dry-run"])
    assert proc.returncode == 2 and "train.global_batch=64" in proc.stderr and "world_size=3" in proc.stderr


@pytest.mark.parametrize("script", ["slurm.sbatch", "local_cpu.sh", "torchrun.sh", "slurm-local/start.sh",
                                    "slurm-local/stop.sh"])
def test_launch_scripts_are_valid_shell(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- the cluster -------------------------------------------------------------------------------------------
def _cluster_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local one-host cluster for this session; stopped at the end unless it was already up."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs slurm-wlm/munge and starts the daemons)")
    was_up = shutil.which("sinfo") is not None and _cluster_answers()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"the local SLURM cluster could not start (launch/slurm-local/start.sh exit {proc.returncode}):"
                    f" {proc.stderr.strip()[-1500:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=300)


def job_fields(job: str) -> Dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for_state(job: str, states: set, timeout: float) -> Dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job)
        if fields.get("JobState") in states:
            return fields
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} not in {states} after {timeout:.0f} s: {fields.get('JobState')} "
                                 f"({fields.get('Reason')})")
        time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch(args: list, env: dict) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_env(out: Path, mode: str, **extra: str) -> dict:
    env = worker_env(out, DISTRAIN_PYTHON=PYTHON, DISTRAIN_SLURM_MODE=mode, **extra)
    if mode == "torchrun":
        env["DISTRAIN_MASTER_PORT"] = str(free_port())  # job ids restart at 1 on a fresh cluster
    return env


def finished_ok(job: str, output: Path, timeout: float = 300) -> Dict[str, str]:
    fields = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
                            timeout)
    assert fields["JobState"] == "COMPLETED", f"job {job}: {fields['JobState']}\n{output.read_text()[-3000:]}"
    return fields


@pytest.mark.slurm
def test_sbatch_trains_the_quickstart_to_completion(slurm_cluster, tmp_path):
    run_dir, output = tmp_path / "runs", tmp_path / "job.out"
    job = sbatch([f"--output={output}", str(REPO / "launch" / "slurm.sbatch"), QUICKSTART, "train.steps=30",
                  f"run.dir={run_dir}", "metrics.progress=none"], job_env(tmp_path / "out", "srun"))
    finished_ok(job, output)
    record = run_json(run_dir)
    assert record["status"] == "finished" and record["step"] == 30 and record["world_size"] == 2
    assert record["attempts"] == [dict(record["attempts"][0], slurm_job_id=job, slurm_restart_count=0)]
    for rank in (0, 1):
        assert f"rank {rank}/2 (slurm)" in (run_dir / "quickstart" / "logs" / f"rank{rank}.log").read_text()


@pytest.mark.slurm
def test_submit_in_torchrun_mode_trains_to_completion(slurm_cluster, tmp_path):
    run_dir, output = tmp_path / "runs", tmp_path / "job.out"
    proc = run_cli(["slurm", "submit", QUICKSTART, "--nodes", "1", "--nproc-per-node", "2", "--mode", "torchrun",
                    "--", f"--output={output}", "train.steps=30", f"run.dir={run_dir}", "metrics.progress=none"],
                   env=job_env(tmp_path / "out", "torchrun"))
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    finished_ok(job, output)
    record = run_json(run_dir)
    assert record["status"] == "finished" and record["step"] == 30 and record["world_size"] == 2
    assert "torchrun: nnodes=1 nproc-per-node=2" in output.read_text()
    for rank in (0, 1):
        assert f"rank {rank}/2 (torchelastic)" in (run_dir / "quickstart" / "logs" / f"rank{rank}.log").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Final weights of an uninterrupted 2-worker run (plain `distrain launch`, no SLURM)."""
    return reference_weights(tmp_path_factory.mktemp("reference"))


@pytest.mark.slurm
@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_preemption_round_trip(slurm_cluster, reference, tmp_path, mode):
    run_dir, out, output = tmp_path / "runs", tmp_path / "out", tmp_path / "job.out"
    job = sbatch([f"--output={output}", str(REPO / "launch" / "slurm.sbatch"), QUICKSTART, *FAST,
                  f"run.dir={run_dir}"], job_env(out, mode, **{DELAY_ENV: "0.1"}))
    try:
        wait_until(lambda: steps_logged(run_dir) >= 4, 240, f"job {job} to reach step 4")
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        # The job requeues itself once the checkpoint is committed; SLURM then holds it back ~2 minutes.
        # From outside (not from within the job), StartTime=now lifts that.
        fields = wait_for_state(job, {"PENDING"}, 120)
        assert int(fields.get("Restarts", 0)) >= 1, fields
        # Not in the same second as the requeue: slurmd revoked the first run's job credential at a time it keeps
        # to the second, and a run started within that second is refused ("Killing non-startable batch JobId=J:
        # Job credential revoked"; the job ends FAILED). SLURM's own ~2 minute hold never meets this; seen 3 times
        # in 16 runs without the pause.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
        finished_ok(job, output)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    record = run_json(run_dir)
    first, second = record["attempts"]
    stopped = second["start_step"]
    print(f"{mode}: USR1 -> stopped after step {stopped}, requeued, resumed with "
          f"SLURM_RESTART_COUNT={second['slurm_restart_count']}")
    assert (first["start_step"], first["slurm_restart_count"]) == (0, 0)
    assert second["slurm_restart_count"] >= 1 and 4 <= stopped < STEPS
    assert record["status"] == "finished" and record["step"] == STEPS
    rank0 = (run_dir / "quickstart" / "logs" / "rank0.log").read_text()
    assert f"saved step {stopped} (preempted)" in rank0 and f"requeued SLURM job {job}" in rank0
    for rank in (0, 1):
        log = (run_dir / "quickstart" / "logs" / f"rank{rank}.log").read_text()
        assert f"stopping after step {stopped} for preemption" in log
        assert f"slurm_restart_count={second['slurm_restart_count']}" in log
    diff = max_rel_diff(reference, load_weights(out, STEPS))
    print(f"{mode}: max relative difference to the uninterrupted run {diff:.3e}")
    assert diff <= TOLERANCE
