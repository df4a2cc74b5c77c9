"""Faults: preemption signals, the step every rank stops at, SLURM requeue, and the hang watchdog's wiring.

A preemption signal (``faults.signals``: SIGUSR1 from SLURM's ``--signal`` timer, SIGTERM from scancel or a
preempting scheduler) only sets a flag: Python runs the handler between bytecodes, and a handler that did
real work could interrupt a collective or a checkpoint half-way. Once per step every rank contributes its
flag to one tiny all-reduce (MAX), so all ranks see the same answer after the same step - even when only some
of them were signalled - and stop there together. The trainer then commits a checkpoint, and rank 0 asks
SLURM to requeue the job (``scontrol requeue``) when the signal is one of ``faults.requeue_signals``; the
requeued job resumes from that checkpoint (``train.resume=auto``).

``FaultTolerance`` is the one object the trainer talks to; it owns the signal handlers and the watchdog.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig

from distrain.env import ProcessInfo
from distrain.watchdog import Watchdog, enable_flight_recorder

# Agreement codes, ordered so that MAX picks the strongest request any rank received.
_NO_STOP, _STOP, _STOP_AND_REQUEUE = 0, 1, 2


def parse_signal(name: str) -> signal.Signals:
    """'USR1', 'sigusr1' or 'SIGUSR1' -> signal.SIGUSR1 (names were validated with the config)."""
    return signal.Signals["SIG" + str(name).upper().removeprefix("SIG")]


class PreemptionHandler:
    """Signal handlers that request a stop; ``agree()`` turns the requests of all ranks into one decision."""

    def __init__(self, signals: Sequence[str], requeue_signals: Sequence[str]):
        self.signals = [parse_signal(s) for s in signals]
        self.requeue_signals = {parse_signal(s) for s in requeue_signals}
        self.received: Optional[signal.Signals] = None
        self.received_at: Optional[float] = None
        self._previous: Dict[signal.Signals, Any] = {}
        # Set by FaultTolerance: why this rank is stuck (inside one step for longer than dist.timeout_s), or None.
        self.stuck: Callable[[], Optional[str]] = lambda: None

    def install(self) -> bool:
        """Install the handlers (main thread only; False elsewhere, where Python does not allow it)."""
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: leave the process's handlers alone
            self.uninstall()
            return False
        return True

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        stuck = self.stuck()
        if stuck:
            logging.getLogger("distrain").error(f"{stuck}; {sig.name} received: ending now")
        if self.received == sig or stuck:
            # The same signal twice: the sender means it. Or this rank is stuck in a step past the collective
            # timeout, so it will never reach the end of the step to checkpoint: the launcher is tearing a failed
            # job down, and waiting for its SIGKILL grace (torchrun: 30 s) only delays the error. Act as if we
            # had never handled it.
            self.uninstall()
            os.kill(os.getpid(), signum)
            return
        if self.received is None or sig in self.requeue_signals:
            self.received, self.received_at = sig, time.time()

    def local_code(self) -> int:
        if self.received is None:
            return _NO_STOP
        return _STOP_AND_REQUEUE if self.received in self.requeue_signals else _STOP

    def agree(self, group: Any = None) -> int:
        """Collective (every rank, once per step): the strongest stop request any rank has received."""
        code = self.local_code()
        if not (torch_dist.is_initialized() and torch_dist.get_world_size(group) > 1):
            return code
        flag = torch.tensor([code], dtype=torch.int32)  # on the CPU: the group used is gloo (see FaultTolerance)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=group)
        return int(flag.item())


def slurm_job_id(environ: Mapping[str, str]) -> Optional[str]:
    """The id `scontrol` knows this job by (array tasks: ARRAYID_TASKID), or None outside SLURM."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str, log: logging.Logger) -> bool:
    """`scontrol requeue JOB`; logs and returns False when SLURM refuses (e.g. a job submitted with --no-requeue)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning(f"cannot requeue SLURM job {job_id}: scontrol is not on PATH")
        return False
    try:
        proc = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning(f"cannot requeue SLURM job {job_id}: {err}")
        return False
    if proc.returncode != 0:
        log.warning(f"`scontrol requeue {job_id}` failed (exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()}. Submit with --requeue to let a job requeue itself.")
        return False
    log.info(f"requeued SLURM job {job_id}: it resumes from the checkpoint just committed")
    return True


def attempt_info(environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """Which run of the job this is: SLURM job id and restart count, torchelastic run id and restart count."""
    info: Dict[str, Any] = {}
    if slurm_job_id(environ):
        info["slurm_job_id"] = slurm_job_id(environ)
        info["slurm_restart_count"] = int(environ.get("SLURM_RESTART_COUNT") or 0)  # unset on the first run
    if environ.get("TORCHELASTIC_RUN_ID"):
        info["torchelastic_run_id"] = environ["TORCHELASTIC_RUN_ID"]
        info["torchelastic_restart_count"] = int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return info


def record_error_file(err: BaseException) -> None:
    """Write torchelastic's error file for this worker, so `torchrun`/`distrain launch` report the real cause.

    A no-op outside torchrun (no TORCHELASTIC_ERROR_FILE). Called by the CLI for errors it turns into exit codes.
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)


class FaultTolerance:
    """The trainer's one handle on faults: signal handlers, the per-step stop agreement, requeue, the watchdog.

    Build it before the process group (it turns torch's flight recorder on), ``start`` it after.
    """

    def __init__(self, cfg: DictConfig, info: ProcessInfo):
        self.cfg = cfg
        self.info = info
        self.preemption = PreemptionHandler(cfg.signals, cfg.requeue_signals) if cfg.signals else None
        self.handling_signals = False
        self.stop_code = _NO_STOP
        self.watchdog: Optional[Watchdog] = None
        self._group: Any = None
        self.log = logging.getLogger("distrain")
        if cfg.watchdog and info.distributed:
            enable_flight_recorder()

    def start(self, log: logging.Logger, timeout_s: float, backend: str) -> None:
        """Once the run is set up: signal handlers, a CPU group for the stop agreement, the heartbeat thread.

        Until then a signal keeps its default action: there is nothing to checkpoint before the first step.
        """
        self.log = log
        self.handling_signals = bool(self.preemption and self.preemption.install())
        if self.preemption and not self.handling_signals:
            log.warning(f"preemption signals {self.cfg.signals} are not handled: the Trainer was not built in the "
                        f"main thread")
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and self.handling_signals:
            # Agree over gloo on the CPU: on NCCL a GPU all-reduce plus .item() would sync the stream every step.
            self._group = torch_dist.new_group(backend="gloo") if backend != "gloo" else None
        if self.cfg.watchdog and self.info.distributed:
            self.watchdog = Watchdog(self.info, timeout_s, log)
            self.watchdog.start()
            if self.preemption is not None:
                self.preemption.stuck = lambda: self._stuck_reason(timeout_s)
        attempt = attempt_info()
        if attempt:
            log.info("attempt: " + ", ".join(f"{k}={v}" for k, v in attempt.items()))

    def _stuck_reason(self, timeout_s: float) -> Optional[str]:
        if self.watchdog is None or self.watchdog.step_age() <= timeout_s:
            return None
        return (f"rank {self.info.rank} is stopping because it has been stuck in step {self.watchdog.step + 1} for "
                f"{self.watchdog.step_age():.0f} s, past dist.timeout_s={timeout_s:g}")

    def record_attempt(self, record: Any, start_step: int) -> None:
        """Append this run of the job (start step, SLURM / torchelastic restart counts) to run.json's attempts."""
        if record is None:
            return
        attempts = list(record.data.get("attempts", []))
        attempts.append({"start_step": start_step, "started": time.time(), **attempt_info()})
        record.update(attempts=attempts)

    # --- in the loop -----------------------------------------------------------------------------------
    def step_started(self, completed: int) -> None:
        if self.watchdog:
            self.watchdog.step_started(completed)

    def should_stop(self, completed: int) -> bool:
        """Collective, once per step on every rank: True on all ranks alike when any rank was signalled."""
        if not self.handling_signals:
            return False
        self.stop_code = self.preemption.agree(self._group)
        if self.stop_code != _NO_STOP:
            mine = self.preemption.received
            self.log.info(f"stopping after step {completed} for preemption: "
                          + (f"this rank received {mine.name}" if mine else "another rank was signalled"))
        return self.stop_code != _NO_STOP

    @property
    def preempted(self) -> bool:
        return self.stop_code != _NO_STOP

    def after_checkpoint(self) -> bool:
        """Rank 0, once the preemption checkpoint is committed: requeue the SLURM job if asked to. True if requeued."""
        job = slurm_job_id(os.environ)
        if not (self.info.is_main and self.stop_code == _STOP_AND_REQUEUE and self.cfg.requeue and job):
            return False
        return requeue_slurm_job(job, self.log)

    # --- on failure --------------------------------------------------------------------------------
    def explain(self, err: BaseException, completed: int) -> Optional[str]:
        """For a failed or timed-out collective: the paragraph that names it, the step and the missing ranks."""
        if self.watchdog is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
            return None
        message = self.watchdog.diagnose(err, completed)
        if message:
            self.log.error(message)
        return message

    def abort_peers(self, err: BaseException) -> None:
        """This rank is failing: tell the others' watchdogs, so a rank stuck outside a collective ends too."""
        if self.watchdog is not None and not isinstance(err, (KeyboardInterrupt, SystemExit)):
            self.watchdog.post_abort(f"{type(err).__name__}: {err}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.preemption is not None:
            self.preemption.uninstall()
