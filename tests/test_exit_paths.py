"""Every way of using the API ends the process, and nothing it started outlives it (issue 18, defects 1 and 11).

Real processes only: tests/workers/exit_script.py is a user's script (TensorDataset, DataLoader workers forced on) run as
`python` or under torchrun; it records its DataLoader workers' pids, and the test checks each is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from conftest import REPO, child_env
from fault_helpers import alive, processes_mentioning
from distrain.data import auto_num_workers

SCRIPT = str(REPO / "tests" / "workers" / "exit_script.py")
EXIT_DEADLINE_S = 30  # the acceptance: a script ends within 30 s of training's end
GONE_DEADLINE_S = 10


def pids_in(out: Path, rank: int = 0) -> List[int]:
    path = out / f"workers-rank{rank}.txt"
    assert path.exists(), f"the script never recorded its workers ({sorted(p.name for p in out.iterdir())})"
    return [int(p) for p in path.read_text().split()]


def wait_gone(pids: List[int], timeout: float = GONE_DEADLINE_S) -> List[int]:
    """The pids still alive after ``timeout`` seconds (empty: all gone)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_all(out: Path, pids: List[int]) -> None:
    """Clean up after a failing test: no orphan (rank or worker) outlives it."""
    ranks = [int(p.read_text()) for p in out.glob("pid-rank*")]
    for pid in ranks + pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start(mode: str, tmp_path: Path, torchrun: int = 0) -> subprocess.Popen:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    args = [SCRIPT, mode, str(tmp_path / "runs"), str(out)]
    if torchrun:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun), *args]
    return subprocess.Popen([sys.executable, *args], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the script did not end within {timeout:.0f} s:\n{out[-3000:]}")
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the script ended (exit {proc.returncode}) before {path.name}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.1)


# --- the ways a script can end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, code", [
    ("plain", 0),  # fit, save the weights, end of file: no with, no close()
    ("with", 0), ("close", 0),
    ("raise", 1),  # an exception inside fit (from the loss_fn)
    ("sysexit", 3),  # sys.exit from the loss_fn
    ("metric_exit", 4),  # sys.exit from an eval metric, called by fit's evaluation
    ("interrupt", -signal.SIGINT),  # Ctrl-C (a real SIGINT) mid-training: KeyboardInterrupt
])
def test_every_way_of_using_the_trainer_ends_the_process_and_its_workers(tmp_path, mode, code):
    proc = start(mode, tmp_path)
    out_dir = tmp_path / "out"
    wait_for(out_dir / "ready-rank0", proc)
    workers = pids_in(out_dir)
    try:
        assert workers, "DataLoader workers were forced on (data.num_workers=2)"
        output = finish(proc, EXIT_DEADLINE_S)
        assert proc.returncode in (code, 128 - code if code < 0 else code), output[-3000:]
        assert not wait_gone(workers), f"DataLoader workers outlived the script ({mode})"
    finally:
        kill_all(out_dir, workers)


def test_a_script_without_close_under_torchrun_ends_with_its_workers(tmp_path):
    proc = start("plain", tmp_path, torchrun=2)
    out_dir = tmp_path / "out"
    for rank in (0, 1):
        wait_for(out_dir / f"ready-rank{rank}", proc)
    workers = pids_in(out_dir, 0) + pids_in(out_dir, 1)
    try:
        assert len(workers) == 4, workers
        output = finish(proc, EXIT_DEADLINE_S)
        assert proc.returncode == 0, output[-3000:]
        assert "rank 1: end of script" in output
        assert not wait_gone(workers)
    finally:
        kill_all(out_dir, workers)


def test_sigterm_after_training_ends_the_process(tmp_path):
    """fit has returned; the process is stuck (here: sleeping): SIGTERM takes its default action, not a stop
    request for a step that will never come."""
    proc = start("after_fit", tmp_path)
    out_dir = tmp_path / "out"
    wait_for(out_dir / "ready-rank0", proc)
    workers = pids_in(out_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        output = finish(proc, EXIT_DEADLINE_S)
        assert proc.returncode == -signal.SIGTERM, output[-3000:]
        assert not wait_gone(workers)
    finally:
        kill_all(out_dir, workers)


def test_kill_9_of_the_training_process_ends_its_dataloader_workers(tmp_path):
    proc = start("busy", tmp_path)  # the workers are busy in the dataset for minutes
    out_dir = tmp_path / "out"
    wait_for(out_dir / "ready-rank0", proc)
    workers = pids_in(out_dir)
    try:
        assert workers
        proc.kill()
        proc.wait()  # not communicate(): an orphaned worker would hold the output pipe open
        proc.stdout.close()
        assert not wait_gone(workers, timeout=5), "orphaned DataLoader workers outlived their training process"
    finally:
        kill_all(out_dir, workers)


# --- the pieces ---------------------------------------------------------------------------------------------------
def test_in_memory_tensor_data_gets_no_workers_by_default():
    tensors = TensorDataset(torch.randn(12, 2), torch.randn(12))
    for data in (tensors, Subset(tensors, [1, 2]), ConcatDataset([tensors, tensors]), torch.randn(12, 3)):
        assert auto_num_workers(data, 1, cpus=16) == 0, type(data).__name__


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    code = ("import os, sys, time; from distrain.env.parent_death import die_with_parent; "
            "die_with_parent(os.getppid() + 10**6); time.sleep(30)")  # a parent pid that is not its parent
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), timeout=60)
    assert proc.returncode == -signal.SIGKILL


# --- `distrain launch` killed with -9 ----------------------------------------------------------------------------
def test_kill_9_of_distrain_launch_ends_its_workers(tmp_path):
    """The agent runs in the launcher's process: its workers end with it (SIGTERM: checkpoint and stop)."""
    run_dir = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "distrain", "launch", "--nproc-per-node", "2",
                             str(REPO / "configs" / "quickstart.yaml"), f"run.dir={run_dir}", "train.steps=100000",
                             "train.log_every=1", "train.eval_every=0", "metrics.progress=none"],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = run_dir / "quickstart" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"loss"' in metrics.read_text()):  # training has started on every rank
        assert proc.poll() is None and time.monotonic() < deadline, f"the launch ended or stalled ({proc.poll()})"
        time.sleep(0.2)
    workers = [pid for pid in processes_mentioning(str(run_dir)) if pid != proc.pid]
    try:
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        assert not wait_gone(workers), "workers of a killed `distrain launch` trained on as orphans"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
