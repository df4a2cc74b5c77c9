"""`distrain doctor` on this machine: every check present, a real 2-process gloo all_reduce, and problems with fixes."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from conftest import run_cli

EXPECTED = {"python", "torch", "deepspeed", "accelerate", "backend gloo", "backend nccl", "backend mpi", "CUDA devices",
            "launcher environment", "SLURM", "port 29500", "/dev/shm", "disk", "deepspeed ops",
            "gloo all_reduce (2 processes)"}


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_doctor_reports_everything_and_measures_gloo_bandwidth():
    started = time.monotonic()
    proc = run_cli(["doctor", "--json"], timeout=120)
    elapsed = time.monotonic() - started
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert EXPECTED <= set(checks), sorted(checks)
    # The machine that runs this suite can train distributed (the rest of the suite does): nothing fails, exit 0.
    assert [c for c in checks.values() if c["status"] == "fail"] == [] and proc.returncode == 0, proc.stdout
    smoke = checks["gloo all_reduce (2 processes)"]
    assert smoke["status"] == "ok", smoke
    bandwidth = float(re.search(r"= ([0-9.]+) GB/s", smoke["detail"]).group(1))
    assert bandwidth > 0
    assert checks["backend gloo"]["detail"] == "available"
    assert "cpu_adam" in checks["deepspeed ops"]["detail"]  # DeepSpeed's own compatibility probe ran
    print(f"doctor took {elapsed:.1f} s; gloo bus bandwidth {bandwidth} GB/s")  # shown with pytest -s


def test_doctor_names_problems_and_what_to_do(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli(["doctor", "--no-smoke-test"], env={"MASTER_PORT": str(port), "RANK": "0"}, timeout=120)
    assert proc.returncode == 1, proc.stdout  # a half-set launcher environment is a failure
    assert f"[WARN] port {port}" in proc.stdout and f"process {os.getpid()}" in proc.stdout
    assert "[FAIL] launcher environment" in proc.stdout and "WORLD_SIZE" in proc.stdout
    assert "-> Unset the stray variables" in proc.stdout
    assert re.search(r"distrain doctor: \d+ ok, \d+ info, \d+ warning\(s\), 1 problem\(s\)", proc.stdout)
    assert "Traceback" not in proc.stderr
