"""A run directory has one owner, a fresh start never deletes a previous run, and run.name stays inside run.dir.

End to end with real processes: two concurrent `distrain launch` into one run directory (the second is refused,
the first's files are intact), `train.resume=never` over a run with checkpoints (refused, nothing touched),
`run.name=..` (refused, nothing written). The lock's staleness rules are pure functions, tested directly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

from conftest import REPO, child_env, read_jsonl, run_cli
from distrain.checkpoint.paths import committed, read_latest, step_name
from distrain.checkpoint.manifest import problem
from distrain.config import load_config
from distrain.telemetry.units import format_duration
from distrain.errors import CheckpointError, ConfigError
from distrain.telemetry.metrics import MetricsWriter
from distrain.training import run_lock
from distrain.training.run_lock import LOCK_NAME, RunDirBusy, RunLock, earlier_attempt_of_same_job, identity, judge

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is (disabled, )?unavailable")

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
MLP = str(REPO / "configs" / "mlp.yaml")


def snapshot(directory: Path) -> Dict[str, Tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- end to end -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pauses and signals the first run's rank 0 by pid")
def test_two_concurrent_launches_into_one_run_dir_the_second_is_refused_the_first_intact(tmp_path):
    run_dir, root = tmp_path / "busy", tmp_path / "busy" / "checkpoints"
    common = [QUICKSTART, f"run.dir={tmp_path}", "run.name=busy", "metrics.progress=none", "train.eval_every=0",
              "train.log_every=1", "checkpoint.every=5"]
    first = subprocess.Popen([sys.executable, "-m", "distrain", "launch", "--nproc-per-node", "1", *common,
                              "train.steps=100000"], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: committed(root) and (run_dir / "run.json").is_file(), first, "its first checkpoint")
        holder = json.loads((run_dir / "run.json").read_text())  # the first run's rank 0: pid and host
        pid = int(holder["pid"])
        os.kill(pid, signal.SIGSTOP)  # alive, holding the run directory, but leaving the CPU to the second launch
        try:
            second = run_cli(["launch", "--nproc-per-node", "1", *common, "train.steps=3"], timeout=240)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {pid} on host {holder['host']}" in second.stderr
        assert "run.name=busy-2" in second.stderr
        os.kill(pid, signal.SIGUSR1)  # the first run checkpoints and stops (a preemption)
        assert first.wait(timeout=180) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # every step once, in order: nobody else wrote here
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "preempted" and record["pid"] == holder["pid"] and len(record["attempts"]) == 1
    assert read_latest(root) == step_name(record["step"])
    assert all(problem(path) is None for _, path in committed(root))
    assert not (run_dir / LOCK_NAME).exists()  # given back on exit


def test_resume_never_over_a_run_with_checkpoints_is_refused_and_touches_nothing(tmp_path):
    from distrain.training.trainer import Trainer

    common = [f"run.dir={tmp_path}", "run.name=old", "metrics.progress=none", "train.eval_every=0",
              "train.log_every=1", "checkpoint.every=4", "checkpoint.keep_last=2"]
    with Trainer(MLP, overrides=[*common, "strategy.name=single", "train.steps=8"]) as trainer:
        trainer.fit()
    run_dir = tmp_path / "old"
    before = snapshot(run_dir)
    assert [s for s, _ in committed(run_dir / "checkpoints")] == [4, 8] and "metrics.jsonl" in before

    fresh = run_cli(["train", MLP, *common, "train.resume=never", "train.steps=2"], timeout=240)
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    assert "train.resume=never would start a new run" in fresh.stderr and "run.name=old-2" in fresh.stderr
    assert "Traceback" not in fresh.stderr
    assert snapshot(run_dir) == before  # checkpoints, metrics.jsonl, run.json, config.yaml, logs: untouched


def test_run_name_dot_dot_is_refused_and_nothing_is_written(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(Path(QUICKSTART).read_text())  # the user's own config.yaml, where `runs/..` would write
    before = snapshot(tmp_path)
    proc = run_cli(["train", "config.yaml", "run.name=..", "train.steps=2", "metrics.progress=none"], cwd=tmp_path,
                   timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.name" in proc.stderr and "'..'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3  # one paragraph (wrapped)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("name", [".", "..", "''", "/tmp/elsewhere", "a/b", "a\\b", "x/../.."])
def test_run_name_must_be_one_plain_directory_name(name):
    with pytest.raises(ConfigError) as info:
        load_config(MLP, [f"run.name={name}"])
    assert info.value.key == "run.name"


def test_fresh_metrics_never_replace_an_earlier_runs_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    stamp = int((tmp_path / "metrics.jsonl").stat().st_mtime)
    (tmp_path / f"metrics.{stamp}.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # kept by an earlier fresh start
    writer = MetricsWriter(tmp_path, load_config(MLP), fresh=True)
    writer.close()
    kept = sorted(p.name for p in tmp_path.glob("metrics.*.jsonl"))
    assert kept == [f"metrics.{stamp}-1.jsonl", f"metrics.{stamp}.jsonl"]
    assert (tmp_path / f"metrics.{stamp}.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (tmp_path / f"metrics.{stamp}-1.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_retention_never_deletes_another_runs_checkpoints(tmp_path):
    """A new lineage in a directory whose checkpoints are all invalid: retention and the 'superseded' cleanup leave
    the earlier run's checkpoints alone."""
    from distrain.training.trainer import Trainer

    fast = [f"run.dir={tmp_path}", "run.name=r", "strategy.name=single", "metrics.progress=none",
            "train.eval_every=0", "checkpoint.keep_last=1"]
    with Trainer(MLP, overrides=[*fast, "train.steps=8", "checkpoint.every=4"]) as trainer:
        trainer.fit()
    root = tmp_path / "r" / "checkpoints"
    for _, path in committed(root):  # both invalid: the next start begins a new run from step 0
        (path / "trainer_state.json").write_text("{}")
    earlier = {path.name: snapshot(path) for _, path in committed(root)}
    with Trainer(MLP, overrides=[*fast, "train.steps=2", "checkpoint.every=1"]) as trainer:
        assert trainer.step == 0
        trainer.fit()
    assert [s for s, _ in committed(root)] == [2, 8] and read_latest(root) == step_name(2)
    assert {name: snapshot(root / name) for name in earlier} == earlier


# --- the lock itself --------------------------------------------------------------------------------------------
def _me(**job) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": "boot-a", "pid_ns": "ns-a",
            "started": time.time(), "job": job, "token": "mine"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staleness_rules():
    me = _me()
    local = dict(me, token="theirs", started=time.time() - 5)
    assert judge(dict(local, pid=_dead_pid()), me, age_s=1, grace_s=600).kind == "stale"
    assert judge(dict(local, pid=os.getppid()), me, age_s=1, grace_s=600).kind == "held"
    young = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # the pid is alive but belongs to a process younger than the lock: reused
        assert judge(dict(local, pid=young.pid, started=time.time() - 3600), me, age_s=1, grace_s=600).kind == "stale"
    finally:
        young.kill()
        young.wait()
    remote = dict(local, host="elsewhere", pid=1)
    assert judge(remote, me, age_s=599, grace_s=600).kind == "held"
    assert judge(remote, me, age_s=601, grace_s=600).kind == "stale"
    rebooted = dict(local, boot_id="boot-b", pid=os.getppid())
    assert judge(rebooted, me, age_s=5, grace_s=600).kind == "held"
    assert judge(rebooted, me, age_s=31, grace_s=600).kind == "stale"
    other_container = dict(local, pid_ns="ns-b", pid=_dead_pid())  # its pids are not ours to check
    assert judge(other_container, me, age_s=5, grace_s=600).kind == "held"


def test_a_restarted_attempt_of_the_same_job_takes_over_and_a_concurrent_run_does_not():
    te = {"torchelastic_run_id": "job1", "torchelastic_restart_count": 0}
    assert earlier_attempt_of_same_job(te, dict(te, torchelastic_restart_count=1))
    assert not earlier_attempt_of_same_job(te, dict(te))  # the same attempt: a second, concurrent launch
    assert not earlier_attempt_of_same_job(te, dict(te, torchelastic_run_id="job2", torchelastic_restart_count=1))
    slurm = {"slurm_job_id": "42", "slurm_restart_count": 0, "torchelastic_run_id": "a"}
    requeued = {"slurm_job_id": "42", "slurm_restart_count": 1, "torchelastic_run_id": "b"}  # a new torchrun id
    assert earlier_attempt_of_same_job(slurm, requeued)
    assert not earlier_attempt_of_same_job(requeued, slurm)
    assert not earlier_attempt_of_same_job(slurm, {"slurm_job_id": "43", "slurm_restart_count": 1})
    assert not earlier_attempt_of_same_job({}, {})

    me = _me(**dict(te, torchelastic_restart_count=1))
    earlier = dict(me, host="other-node", pid=1, job=te, token="theirs")
    assert judge(earlier, me, age_s=5, grace_s=600).kind == "wait"  # may still be ending: heartbeats decide
    assert judge(earlier, me, age_s=31, grace_s=600).kind == "stale"
    concurrent = dict(earlier, job=dict(te, torchelastic_restart_count=1))
    assert judge(concurrent, me, age_s=31, grace_s=600).kind == "held"


def _plant(run_dir: Path, age_s: float = 0, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps(dict(identity(), token="planted", **holder)))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_acquire_reclaims_stale_locks_refuses_live_ones_and_releases_only_its_own(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    lock = RunLock.acquire(tmp_path / "a", grace_s=600)  # a directory with no lock
    assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == os.getpid() and not lock.notes
    lock.release()
    assert not (tmp_path / "a" / LOCK_NAME).exists()

    _plant(tmp_path / "b", pid=_dead_pid())  # a hard kill on this host: reclaimed at once, with a note
    lock = RunLock.acquire(tmp_path / "b", grace_s=600)
    assert len(lock.notes) == 1 and "reclaimed the stale lock" in lock.notes[0] and "is gone" in lock.notes[0]
    lock.release()

    _plant(tmp_path / "c", host="elsewhere", pid=1)  # another host, refreshed just now: a live run
    with pytest.raises(RunDirBusy) as busy:
        RunLock.acquire(tmp_path / "c", grace_s=600)
    assert busy.value.holder["host"] == "elsewhere" and busy.value.verdict.kind == "held"
    _plant(tmp_path / "c", age_s=700, host="elsewhere", pid=1)  # ... silent past the grace
    lock = RunLock.acquire(tmp_path / "c", grace_s=600)
    assert "more than run.lock_grace_s=600" in lock.notes[0]
    lock.release()

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / LOCK_NAME).write_text("")  # half written by a run that died in the middle
    os.utime(tmp_path / "d" / LOCK_NAME, (time.time() - 60, time.time() - 60))
    RunLock.acquire(tmp_path / "d", grace_s=600).release()

    (tmp_path / "e").mkdir()
    lock = RunLock.acquire(tmp_path / "e", grace_s=600)
    planted = _plant(tmp_path / "e", host="elsewhere", pid=1)  # someone replaced it meanwhile: not ours to remove
    lock.release()
    assert planted.exists()

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    (tmp_path / "f").mkdir()
    lock = RunLock.acquire(tmp_path / "f", grace_s=600)
    stamp = (tmp_path / "f" / LOCK_NAME).stat().st_mtime
    os.utime(tmp_path / "f" / LOCK_NAME, (stamp - 100, stamp - 100))
    time.sleep(0.5)
    assert (tmp_path / "f" / LOCK_NAME).stat().st_mtime > stamp - 50  # the holder keeps it fresh
    lock.release()


def test_trainer_refuses_a_locked_run_dir_and_gives_it_back_on_every_exit(tmp_path):
    from distrain.training.trainer import Trainer

    fast = [f"run.dir={tmp_path}", "run.name=t", "strategy.name=single", "metrics.progress=none",
            "train.eval_every=0", "train.steps=2"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / "t", pid=sleeper.pid, started=time.time())
        with pytest.raises(ConfigError) as info:
            Trainer(MLP, overrides=fast)
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in str(info.value)
        assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: reclaimed; then a failure after the lock was taken gives it back at once.
    with pytest.raises(CheckpointError, match="train.resume"):  # refused after the lock was taken
        Trainer(MLP, overrides=[*fast, f"train.resume={tmp_path / 'no-such-checkpoint'}"])
    assert not (tmp_path / "t" / LOCK_NAME).exists()
    with Trainer(MLP, overrides=fast) as trainer:
        assert (tmp_path / "t" / LOCK_NAME).exists()
        with pytest.raises(ConfigError, match="this very process holds it"):
            Trainer(MLP, overrides=fast)
        trainer.fit()
    assert not (tmp_path / "t" / LOCK_NAME).exists()
    assert "reclaimed the stale lock" in (tmp_path / "t" / "logs" / "rank0.log").read_text()


def test_starting_a_finished_run_again_says_so_and_the_suggested_keys_work(tmp_path):
    """A second start of a finished run resumed at its last step and exited 0 having trained nothing, silently.
    It now says so in one line naming what to change; raising train.steps, as it suggests, continues the run."""
    common = [MLP, f"run.dir={tmp_path}", "metrics.progress=plain", "train.eval_every=0", "train.log_every=1"]
    first = run_cli(["train", *common, "train.steps=4"], timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((tmp_path / "mlp-digits" / "run.json").read_text())
    again = run_cli(["train", *common, "train.steps=4"], timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert ("run 'mlp-digits' already finished at step 4 of train.steps=4: nothing to train. To train again, use "
            "another run.name (e.g. run.name=mlp-digits-2); to continue this run, raise train.steps (e.g. "
            "train.steps=8).") in said
    # The start that trained nothing leaves the finished run's record as it was (its final loss and wall time were
    # replaced by an empty attempt's: `distrain runs` then showed WALL 0:00:00).
    after = json.loads((tmp_path / "mlp-digits" / "run.json").read_text())
    assert {k: after.get(k) for k in ("status", "started", "start_step", "final", "attempts")} == \
        {k: record.get(k) for k in ("status", "started", "start_step", "final", "attempts")}
    listed = run_cli(["runs", "ls", str(tmp_path)], timeout=120)
    wall = format_duration(record["final"]["wall_s"])
    header, row = listed.stdout.splitlines()[0], listed.stdout.splitlines()[-1]
    column = header.index("WALL")  # the table is aligned: the row's value starts where its header does
    assert listed.returncode == 0 and row[column:].split()[0] == wall, listed.stdout
    more = run_cli(["train", *common, "train.steps=8"], timeout=240)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "step 8/8" in more.stdout + more.stderr and "already finished" not in more.stdout + more.stderr
