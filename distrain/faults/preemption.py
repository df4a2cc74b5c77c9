"""Preemption signals: handlers that only set a flag, which the stop agreement turns into one decision.

A preemption signal (``faults.signals``: SIGUSR1 from SLURM's ``--signal`` timer, SIGTERM from scancel or a
preempting scheduler) only sets a flag: Python runs the handler between bytecodes, and a handler that did real
work could interrupt a collective or a checkpoint half-way. Every rank's flag goes into the agreement
(``distrain.faults.stop_agreement``), so all ranks stop after the same step - even when only some of them were
signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Dict, Optional, Sequence

# Agreement codes, ordered so that MAX picks the strongest request any rank received.
NO_STOP, STOP, STOP_AND_REQUEUE = 0, 1, 2


def parse_signal(name: str) -> signal.Signals:
    """'USR1', 'sigusr1' or 'SIGUSR1' -> signal.SIGUSR1 (names were validated with the config)."""
    return signal.Signals["SIG" + str(name).upper().removeprefix("SIG")]


class PreemptionHandler:
    """Signal handlers that request a stop (``local_code``); the stop agreement turns every rank's into one."""

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

    @property
    def installed(self) -> bool:
        return bool(self._previous)

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
            return NO_STOP
        return STOP_AND_REQUEUE if self.received in self.requeue_signals else STOP
