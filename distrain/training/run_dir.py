"""Taking ownership of a run directory before anything is written into it.

Rank 0 creates ``run.dir/run.name``, takes its lock (``distrain.training.run_lock``), and refuses a fresh start
(``train.resume=never``) over the checkpoints of an earlier run: distrain never deletes, and never mixes, a previous
run's checkpoints. Every other rank waits for rank 0's verdict and raises the same error, so a refused run ends on
every rank at once instead of leaving peers waiting in a collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from distrain import dist
from distrain.checkpoint.paths import checkpoints_root, committed, read_latest
from distrain.env import ProcessInfo
from distrain.errors import ConfigError
from distrain.training.run_lock import HEARTBEAT_S, MAX_WAIT_S, SILENT_BEATS, RunDirBusy, RunLock, describe_holder


def claim_run_dir(run_dir: Path, cfg: DictConfig, info: ProcessInfo) -> Optional[RunLock]:
    """Rank 0: create ``run_dir``, own it, check that this start may write there; returns the lock (None on the
    other ranks). Collective: every rank returns, or every rank raises the same ConfigError."""
    lock, outcome = None, None
    if info.is_main:
        try:
            lock = _claim(run_dir, cfg)
        except ConfigError as err:
            outcome = (str(err), err.key)
    outcome = dist.broadcast_object(outcome)
    if outcome is not None:
        raise ConfigError(outcome[0], key=outcome[1])
    return lock


def _claim(run_dir: Path, cfg: DictConfig) -> RunLock:
    # Peers wait for this verdict in a collective: an earlier attempt's lock is awaited for at most half the timeout.
    wait_s = min(MAX_WAIT_S, float(cfg.dist.timeout_s) / 2)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir, float(cfg.run.lock_grace_s), max_wait_s=wait_s)
    except RunDirBusy as busy:
        raise ConfigError(_busy_message(run_dir, busy, cfg), key="run.name") from None
    except OSError as err:  # mkdir succeeds on a read-only dir; the lock file is the first write
        raise ConfigError(f"Run directory '{run_dir}' (run.dir/run.name) cannot be written: "
                          f"{err.strerror}. Choose a writable run.dir.", key="run.dir") from None
    try:
        refuse_fresh_start_over_checkpoints(run_dir, cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def refuse_fresh_start_over_checkpoints(run_dir: Path, cfg: DictConfig) -> None:
    """``train.resume=never`` in a run directory that holds committed checkpoints: a ConfigError pointing to run.name.

    Starting over there would let the new run's retention delete the old checkpoints and its ``latest`` replace the
    old one; moving them aside silently would surprise as much. The user chooses: a new run.name, or resume.
    """
    if cfg.train.resume != "never":
        return
    root = checkpoints_root(run_dir)
    found = committed(root)
    if not found:
        return
    names = [p.name for _, p in found]
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)} in all)"
    latest = read_latest(root)
    raise ConfigError(
        f"train.resume=never would start a new run from step 0 in {run_dir}, which holds the checkpoints of an earlier "
        f"run ({shown}{f'; latest {latest}' if latest else ''}). distrain never deletes or mixes a previous run's "
        f"checkpoints: start the new run under another name (run.name={cfg.run.name}-2, for example), continue this "
        f"one with train.resume=auto, or move {root} away yourself to start over in this directory.",
        key="train.resume")


def finished_note(cfg: DictConfig, step: int) -> Optional[str]:
    """One line for a resume that lands at or past ``train.steps`` (a finished run started again): nothing will
    train, and the user learns why and which keys change that; None when there are steps left."""
    steps = int(cfg.train.steps)
    if step < steps:
        return None
    return (f"run '{cfg.run.name}' already finished at step {step} of train.steps={steps}: nothing to train. To "
            f"train again, use another run.name (e.g. run.name={cfg.run.name}-2); to continue this run, raise "
            f"train.steps (e.g. train.steps={2 * max(step, steps)}).")


def _busy_message(run_dir: Path, busy: RunDirBusy, cfg: DictConfig) -> str:
    holder = describe_holder(busy.holder)
    if busy.verdict.kind == "wait":
        why = (f"The lock belongs to an earlier attempt of this job that was refreshed {busy.age_s:.0f} s ago; a "
               f"restarted attempt takes it over once it has been silent for {SILENT_BEATS * HEARTBEAT_S:g} s, and "
               f"this attempt waited as long as dist.timeout_s allows.")
    else:
        why = (f"Two runs writing one run directory would overwrite each other's checkpoints and metrics. Wait for it "
               f"to finish or stop it, or start this run under another name (run.name={cfg.run.name}-2, for example). A "
               f"lock left behind by a process that was killed is reclaimed by the next start: at once on the same "
               f"host, after run.lock_grace_s={float(cfg.run.lock_grace_s):g} s without a refresh from another host "
               f"(it was refreshed {busy.age_s:.0f} s ago); delete {busy.path} only if you are sure that run is gone.")
    return (f"Run directory {run_dir} is in use by another run: {holder} holds {busy.path} "
            f"({busy.verdict.reason}). {why}")


__all__ = ["claim_run_dir", "finished_note", "refuse_fresh_start_over_checkpoints"]
