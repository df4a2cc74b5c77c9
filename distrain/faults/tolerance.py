"""The trainer's one handle on faults: signal handlers, the per-step stop agreement, SLURM requeue, the watchdog.

After a preemption signal every rank stops after the same step (``distrain.faults.preemption``); the trainer then
commits a checkpoint, and rank 0 asks SLURM to requeue the job (``scontrol requeue``, ``distrain.faults.requeue``)
when the signal is one of ``faults.requeue_signals``; the requeued job resumes from that checkpoint
(``train.resume=auto``). The watchdog (``distrain.faults.watchdog``) names the rank and collective a hang waits on.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch.distributed as torch_dist
from omegaconf import DictConfig

from distrain.env import ProcessInfo
from distrain.faults.preemption import NO_STOP, STOP_AND_REQUEUE, PreemptionHandler
from distrain.faults.requeue import attempt_info, requeue_slurm_job, slurm_job_id
from distrain.faults.stop_agreement import StopAgreement
from distrain.faults.watchdog import Watchdog, enable_flight_recorder


class FaultTolerance:
    """The trainer's one handle on faults: signal handlers, the per-step stop agreement, requeue, the watchdog.

    Build it before the process group (it turns torch's flight recorder on), ``start`` it after.
    """

    def __init__(self, cfg: DictConfig, info: ProcessInfo):
        self.cfg = cfg
        self.info = info
        self.preemption = PreemptionHandler(cfg.signals, cfg.requeue_signals) if cfg.signals else None
        self.handling_signals = False
        self.stop_code = NO_STOP
        self.watchdog: Optional[Watchdog] = None
        self._group: Any = None
        self.agreement: Optional[StopAgreement] = None  # with signals handled on several ranks
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
            self.agreement = StopAgreement(self._group)
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
        """Append this run of the job (start step, world size, SLURM / torchelastic restart counts) to run.json's
        attempts: an elastic job that lost or regained a node shows each world size it ran at."""
        if record is None:
            return
        attempts = list(record.data.get("attempts", []))
        attempts.append({"start_step": start_step, "world_size": self.info.world_size, "started": time.time(),
                         **attempt_info()})
        record.update(attempts=attempts)

    # --- in the loop -----------------------------------------------------------------------------------
    def step_started(self, completed: int) -> None:
        if self.watchdog:
            self.watchdog.step_started(completed)

    def should_stop(self, completed: int, last: bool = False) -> bool:
        """Collective, after every step on every rank: True on all ranks alike once the stop agreement
        (``distrain.faults.stop_agreement``: lagged and spaced) finds a rank that was signalled. After the ``last``
        step the agreement in flight is only collected: the run is complete, there is nothing to stop."""
        if not self.handling_signals:
            return False
        request = self.preemption.local_code()
        if self.agreement is not None:  # several ranks
            request = self.agreement.collect(completed, request, start_next=not last)
        self.stop_code = NO_STOP if last else request
        if self.stop_code != NO_STOP:
            mine = self.preemption.received
            self.log.info(f"stopping after step {completed} for preemption: "
                          + (f"this rank received {mine.name}" if mine else "another rank was signalled"))
        return self.stop_code != NO_STOP

    @property
    def preempted(self) -> bool:
        return self.stop_code != NO_STOP

    def after_checkpoint(self) -> bool:
        """Rank 0, once the preemption checkpoint is committed: requeue the SLURM job if asked to. True if requeued."""
        job = slurm_job_id(os.environ)
        if not (self.info.is_main and self.stop_code == STOP_AND_REQUEUE and self.cfg.requeue and job):
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

    def training(self, active: bool) -> None:
        """``fit`` starts (True) or has ended (False). Outside ``fit`` there is no step left to stop at, so a stop
        signal takes its default action again: a SIGTERM after training ends the process, as the sender meant."""
        if not self.handling_signals or self.preemption is None:
            return
        if active and not self.preemption.installed:
            self.preemption.install()
        elif not active:
            self.preemption.uninstall()

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.preemption is not None:
            self.preemption.uninstall()
        if self.agreement is not None:  # an agreement in flight after a failure: before its group goes
            self.agreement.drop_finished()
        if self._group is not None:  # the gloo group of the stop agreement (NCCL runs)
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group(self._group)
            self._group = None
