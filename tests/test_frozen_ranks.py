"""A frozen rank (SIGSTOP: alive, connections open, answering nothing) in a real 2-rank `distrain launch` job.

Rank 0 is the hard case: it hosts the job's c10d store (``distrain launch`` gives every attempt a store of its own
rank 0), so every store read of the other ranks blocks on it. The job must still end within 2 x dist.timeout_s,
naming rank 0 as the silent store owner; a frozen rank 1 must still be named by its stale heartbeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fault_helpers import DELAY_ENV, alive, launch_command, processes_mentioning, steps_logged, wait_until, worker_env

TIMEOUT_S = 15
OVERRIDES = ["train.steps=400", f"dist.timeout_s={TIMEOUT_S}", "checkpoint.at_end=false"]


def _freeze_one(tmp_path: Path, frozen: int) -> tuple:
    """Launch 2 ranks, SIGSTOP rank ``frozen`` mid-training; returns (seconds until the other rank ended, the
    launcher's output, the other rank's log)."""
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    proc = subprocess.Popen(launch_command(2, run_dir, OVERRIDES), env=worker_env(out, **{DELAY_ENV: "0.2"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = {}
    try:
        wait_until(lambda: steps_logged(run_dir) >= 3 and all((out / f"pid.rank{r}").exists() for r in (0, 1)),
                   240, "step 3", proc)
        pids = {r: int((out / f"pid.rank{r}").read_text()) for r in (0, 1)}
        os.kill(pids[frozen], signal.SIGSTOP)
        frozen_at = time.monotonic()
        other = pids[1 - frozen]
        wait_until(lambda: not alive(other), 4 * TIMEOUT_S, f"rank {1 - frozen} to end")
        took = time.monotonic() - frozen_at
    finally:
        for pid in pids.values():  # the frozen rank: wake it so the agent's SIGTERM can end it, then make sure
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        try:
            output, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            for pid in pids.values():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    print(f"rank {frozen} frozen -> rank {1 - frozen} ended in {took:.1f} s (dist.timeout_s={TIMEOUT_S})")
    log = (run_dir / "quickstart" / "logs" / f"rank{1 - frozen}.log").read_text()
    assert processes_mentioning(str(run_dir)) == [], "worker processes outlived the job"
    return took, output, log, proc.returncode


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_a_frozen_rank_0_is_named_as_the_silent_store_owner(tmp_path):
    took, output, log, code = _freeze_one(tmp_path, frozen=0)
    assert took <= 2 * TIMEOUT_S, f"rank 1 took {took:.1f} s to end after rank 0 froze"
    assert code == 1, output[-3000:]
    for needed in ("rank 0 did not answer", "hosts the job's c10d store", "frozen"):
        assert needed in log, f"{needed!r} missing from rank 1's log:\n{log[-3000:]}"
    report = [line for line in output.splitlines() if line.startswith("distrain: error: worker rank")]
    assert report and "rank 0 did not answer" in report[0], output[-3000:]
    print(report[0])
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow  # minutes of real multi-rank runs: the default run stays under 15 min; CI runs -m slow
def test_a_frozen_rank_1_is_named_by_its_stale_heartbeat(tmp_path):
    took, output, log, code = _freeze_one(tmp_path, frozen=1)
    assert took <= 2 * TIMEOUT_S, f"rank 0 took {took:.1f} s to end after rank 1 froze"
    assert code == 1, output[-3000:]
    assert "rank 1 did not arrive" in log and "frozen or unreachable" in log, log[-3000:]
