"""A child process that ends with its parent, whatever kills the parent (kill -9 included).

On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, sig)`` sends ``sig`` to this process when the thread that
forked it exits. Elsewhere (or where prctl is refused) a daemon thread watches the parent's pid once a second and
ends the process when it changes. Either way a parent that died before the call is caught at once: the parent pid
is compared with the one the caller expected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Mapping, Optional

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0
# Set by `distrain launch` for the workers torchrun's agent (running in the launcher's process) spawns.
LAUNCHER_PID_ENV = "DISTRAIN_LAUNCHER_PID"


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask the kernel for ``sig`` at the parent's death; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, sig: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), sig)


def die_with_parent(parent_pid: Optional[int] = None, sig: int = signal.SIGKILL) -> str:
    """Have this process receive ``sig`` when its parent (``parent_pid``, default the current one) exits.

    Returns how: "prctl", "watch" (the fallback thread) or "gone" (the parent had already exited: ``sig`` is sent
    now). Call it first thing in the child; it costs one system call (or one thread)."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    how = "prctl" if _prctl_pdeathsig(sig) else "watch"
    if os.getppid() != parent_pid:  # the parent died before the kernel (or the thread) could watch it
        os.kill(os.getpid(), sig)
        return "gone"
    if how == "watch":
        threading.Thread(target=_watch_parent, args=(parent_pid, sig), name="distrain-parent-watch",
                         daemon=True).start()
    return how


def end_with_launcher(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """In a worker of `distrain launch`: receive SIGTERM when the launcher dies (``kill -9`` of it included), so
    no worker trains on as an orphan. SIGTERM, not SIGKILL: the rank handles it like a preemption (every rank stops
    after the same step and commits a checkpoint), or, outside training, ends. None when not launched that way."""
    environ = os.environ if environ is None else environ
    launcher = environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return None
    return die_with_parent(int(launcher), signal.SIGTERM)
