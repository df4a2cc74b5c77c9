"""Shared helpers: run the real CLI and real multi-process jobs (gloo), never mocks."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
# Helper modules and torchrun worker scripts live in tests/workers/ and are imported by bare name: by the tests
# (this path on sys.path) and by child processes as `module:object` (e.g. strategy.name=fault_helpers:FaultDDP),
# for which child_env puts it on PYTHONPATH.
WORKERS_DIR = REPO / "tests" / "workers"
sys.path.insert(0, str(WORKERS_DIR))

# The test suite runs on the CPU with gloo on every machine, unless a test is about CUDA (marker `gpu`): with GPUs
# visible, dist.device=auto would put every rank of a multi-rank test on NCCL, two of them on one GPU of a 1-GPU
# machine. So this process and its children see no GPU; `gpu` tests pass gpu=True to give their children the GPUs.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def child_env(extra: Optional[Dict[str, str]] = None, gpu: bool = False) -> Dict[str, str]:
    """The environment for a child process: no inherited launcher variables, one thread per process, this
    checkout and tests/workers/ on PYTHONPATH, and no GPU unless ``gpu`` (then the GPUs this test session was
    started with)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # a rank that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack: a rare teardown abort names itself
    env.setdefault("PYTHONFAULTHANDLER", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(WORKERS_DIR), env.get("PYTHONPATH", "")])
    if gpu:
        env.pop("CUDA_VISIBLE_DEVICES")
        if VISIBLE_GPUS is not None:
            env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], cwd: Optional[Path] = None, timeout: float = 300,
            env: Optional[Dict[str, str]] = None, gpu: bool = False) -> subprocess.CompletedProcess:
    """`python -m distrain ARGS` in a child process; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "distrain", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env(env, gpu=gpu))


def run_cli_here(args: Sequence[object], capsys) -> tuple:
    """The real CLI entry point (`distrain.cli.main`) in this process, without an interpreter start-up:
    (exit code, stdout, stderr) captured by pytest's ``capsys``."""
    from distrain.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_torchrun(nproc: int, target: Sequence[str], cwd: Optional[Path] = None, timeout: float = 300,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N TARGET...` (TARGET: a script and args, or -m module args)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=child_env(env))


def read_jsonl(path: Path) -> list:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def repo() -> Path:
    return REPO


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """CUDA devices this test session was started with (asked in a child: this process hides them)."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120, env=child_env(gpu=True))
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("gpu") is not None and gpu_count() == 0:
        pytest.skip("needs a CUDA GPU")
@pytest.fixture
def one_thread():
    """One intra-op thread for a test that trains in this process, as the child processes have
    (OMP_NUM_THREADS=1): on a small shared machine more threads only fight each other over tiny models."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
