"""A run directory has one owner: rank 0 holds ``<run_dir>/run.lock`` for as long as the run lives.

The lock is a small JSON file (pid, host, start time, and the job and attempt that hold it). It is created
atomically: written under a temporary name, then hard-linked to ``run.lock`` (a link fails if the name exists, also
on NFS); where the file system cannot link, an exclusive create. The holder refreshes its modification time every
``HEARTBEAT_S`` seconds from a background thread, and removes it on every exit path; a hard kill leaves it behind.

A lock is stale, and reclaimed with a line in the run's log, when
  * its holder ran on this machine (same host name, boot and pid namespace) and that process is gone, or its pid now
    belongs to a process younger than the lock;
  * it was not refreshed for ``run.lock_grace_s`` seconds (a holder on another machine, whose process we cannot see);
  * it was written on this host name before the machine rebooted, and not refreshed for three heartbeats since;
  * it belongs to an earlier attempt of this very job and was not refreshed for three heartbeats: same SLURM job id
    (a requeue keeps it, ``SLURM_RESTART_COUNT`` grows) or same torchelastic run id (``--max-restarts`` keeps it,
    ``TORCHELASTIC_RESTART_COUNT`` grows). A launcher starts a new attempt only once the previous one has ended, but
    the new rank 0 may run on another node, where the old pid cannot be checked; the silent heartbeat proves the old
    holder is gone. A concurrent second run is never "an earlier attempt of this job" - its job id differs, or its
    attempt is not later - and a live holder keeps heartbeating, so it is refused.
Anything else is a live run: the new one is refused in one paragraph naming the holder.

Modification times are compared on the file system's own clock (the mtime of a file written just now beside the
lock), so hosts whose clocks disagree still judge ages correctly.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from distrain.telemetry.logs import get_logger

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0  # how often the holder refreshes the lock
SILENT_BEATS = 3  # heartbeats an earlier attempt of the same job (or a rebooted host) must have missed
MAX_WAIT_S = SILENT_BEATS * HEARTBEAT_S + 5  # the longest a start waits for such an attempt's lock to fall silent
_UNREADABLE_WAIT_S = 5.0  # a lock being written (exclusive-create fallback) is empty for a moment


# --- who is who -------------------------------------------------------------------------------------------------
def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host see different pids
    except OSError:
        return None


def identity() -> Dict[str, Any]:
    """What the lock says about its holder: this process, this machine, this job and attempt."""
    from distrain.faults.requeue import attempt_info  # lazy: distrain.faults pulls in torch.distributed

    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "started": time.time(), "job": attempt_info(),
            "token": uuid.uuid4().hex}


def process_alive(pid: int, started: Optional[float]) -> bool:
    """Whether ``pid`` on this host is still the process that started at or before ``started`` (epoch seconds), not a
    later one that was given its number."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        fields = []
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent: gone all the same
        return False
    birth = _process_start_time(fields)
    # A pid reused by a process born after the run started is not the run (2 s of clock-tick slack).
    return birth is None or started is None or birth <= started + 2.0


def _process_start_time(fields: List[str]) -> Optional[float]:
    """Epoch seconds at which a process started, from the fields of its /proc/PID/stat (Linux); None elsewhere."""
    try:
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _same(a: Any, b: Any) -> bool:
    """Equal, or unknown on one side (a platform without /proc)."""
    return a is None or b is None or a == b


def earlier_attempt_of_same_job(holder_job: Dict[str, Any], my_job: Dict[str, Any]) -> bool:
    """Whether the lock's job is this job, at an earlier attempt (a SLURM requeue or a torchelastic restart)."""
    mine_slurm, theirs_slurm = my_job.get("slurm_job_id"), holder_job.get("slurm_job_id")
    if mine_slurm or theirs_slurm:
        if mine_slurm != theirs_slurm:
            return False
        mine, theirs = my_job.get("slurm_restart_count", 0), holder_job.get("slurm_restart_count", 0)
        if mine != theirs:
            return mine > theirs
    run_id = my_job.get("torchelastic_run_id")
    if not run_id or run_id != holder_job.get("torchelastic_run_id"):
        return False
    return my_job.get("torchelastic_restart_count", 0) > holder_job.get("torchelastic_restart_count", 0)


@dataclass
class Verdict:
    kind: str  # "held": refuse | "stale": reclaim | "wait": an earlier attempt of this job that may still be ending
    reason: str


def judge(holder: Dict[str, Any], me: Dict[str, Any], age_s: float, grace_s: float) -> Verdict:
    """Whether the lock of ``holder``, last refreshed ``age_s`` seconds ago, still belongs to a live run."""
    silent = age_s > SILENT_BEATS * HEARTBEAT_S
    same_host = holder.get("host") == me["host"]
    if same_host and _same(holder.get("boot_id"), me["boot_id"]) and _same(holder.get("pid_ns"), me["pid_ns"]):
        pid = holder.get("pid")
        if not isinstance(pid, int) or not process_alive(pid, holder.get("started")):
            return Verdict("stale", f"its process {pid} on this host is gone")
        if pid == me["pid"]:
            return Verdict("held", "this very process holds it: a Trainer on this run directory that was not closed")
        return Verdict("held", "its process is running on this host")
    if same_host and holder.get("boot_id") != me["boot_id"] and silent:
        return Verdict("stale", f"this host restarted since, and the lock was last refreshed {age_s:.0f} s ago")
    if age_s > grace_s:
        return Verdict("stale", f"it was last refreshed {age_s:.0f} s ago, more than run.lock_grace_s={grace_s:g}")
    if earlier_attempt_of_same_job(holder.get("job") or {}, me["job"]):
        if silent:
            return Verdict("stale", f"it belongs to an earlier attempt of this job, silent for {age_s:.0f} s")
        return Verdict("wait", "it belongs to an earlier attempt of this job, which may still be ending")
    return Verdict("held", f"it was refreshed {age_s:.0f} s ago")


def describe_holder(holder: Dict[str, Any]) -> str:
    """'pid 123 on host node7 since 2024-05-01 12:00:03 (SLURM job 42, restart 0)'."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
        if isinstance(holder.get("started"), (int, float)) else "an unknown time"
    job = holder.get("job") or {}
    parts = []
    if job.get("slurm_job_id"):
        parts.append(f"SLURM job {job['slurm_job_id']}, restart {job.get('slurm_restart_count', 0)}")
    if job.get("torchelastic_run_id"):
        parts.append(f"torchelastic run {job['torchelastic_run_id']}, "
                     f"restart {job.get('torchelastic_restart_count', 0)}")
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}"
            + (f" ({'; '.join(parts)})" if parts else ""))


class RunDirBusy(Exception):
    """The run directory is owned by a live run (``holder``, ``verdict``)."""

    def __init__(self, path: Path, holder: Dict[str, Any], verdict: Verdict, age_s: float):
        super().__init__(verdict.reason)
        self.path, self.holder, self.verdict, self.age_s = path, holder, verdict, age_s


# --- the lock --------------------------------------------------------------------------------------------------
class RunLock:
    """The lock of one run directory, held by this process: ``acquire``, then ``release`` (idempotent)."""

    def __init__(self, path: Path, me: Dict[str, Any], notes: List[str]):
        self.path = path
        self.me = me
        self.notes = notes  # stale locks reclaimed on the way in, for the run's log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="distrain-run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # an exception out of the Trainer, or sys.exit, still gives the directory back

    @classmethod
    def acquire(cls, run_dir: Path, grace_s: float, max_wait_s: float = MAX_WAIT_S) -> "RunLock":
        """Take ``run_dir``'s lock, reclaiming a stale one; raises RunDirBusy when a live run holds it, and OSError
        when the directory cannot be written."""
        path = Path(run_dir) / LOCK_NAME
        me = identity()
        text = json.dumps(me, indent=1)
        probe = path.with_name(f".{LOCK_NAME}.{me['token']}")
        _write_synced(probe, text)
        notes: List[str] = []
        deadline = time.monotonic() + max_wait_s
        try:
            while True:
                if _create_exclusive(probe, path, text):
                    return cls(path, me, notes)
                try:
                    holder, mtime = _read_lock(path)
                except FileNotFoundError:
                    continue  # released (or reclaimed) just now: try again
                os.utime(probe)  # "now" on the file system's clock
                age = max(0.0, probe.stat().st_mtime - mtime)
                if holder is None:  # half written, or garbage
                    verdict = Verdict("wait", "it is being written") if age < _UNREADABLE_WAIT_S else \
                        Verdict("stale", "it is unreadable")
                    holder = {}
                else:
                    verdict = judge(holder, me, age, grace_s)
                if verdict.kind == "stale":
                    if _reclaim(path, holder, me["token"]):
                        notes.append(f"run directory: reclaimed the stale lock {path} of {describe_holder(holder)}: "
                                     f"{verdict.reason}")
                    continue
                if verdict.kind == "wait" and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise RunDirBusy(path, holder, verdict, age)
        finally:
            _unlink(probe)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder, _ = _read_lock(self.path)
            except OSError:
                holder = None
            if not holder or holder.get("token") != self.me["token"]:
                self._report_lost(holder)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a storage hiccup: the next beat tries again

    def _report_lost(self, holder: Optional[Dict[str, Any]]) -> None:
        who = f"now held by {describe_holder(holder)}" if holder else "removed"
        get_logger().error(f"run directory: the lock {self.path} is no longer this run's ({who}); another run may be "
                           f"writing into this run directory")

    def release(self) -> None:
        """Stop refreshing and remove the lock, if it is still ours (never another run's, never from a fork)."""
        if self._stop.is_set() or os.getpid() != self.me["pid"]:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        atexit.unregister(self.release)
        try:
            holder, _ = _read_lock(self.path)
        except OSError:
            return
        if holder and holder.get("token") == self.me["token"]:
            _unlink(self.path)


# --- file primitives -------------------------------------------------------------------------------------------
def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        _write_and_sync(f, text)


def _write_and_sync(f: Any, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _create_exclusive(probe: Path, path: Path, text: str) -> bool:
    """Put ``probe``'s content at ``path`` unless something is there; True when we did."""
    try:
        os.link(probe, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # a file system without hard links: an exclusive create (readers see it empty for a moment)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        _write_and_sync(f, text)
    return True


def _read_lock(path: Path):
    """(holder dict or None when unreadable, mtime); FileNotFoundError when there is no lock."""
    mtime = path.stat().st_mtime
    try:
        holder = json.loads(path.read_text())
    except ValueError:
        return None, mtime
    return (holder if isinstance(holder, dict) else None), mtime


def _reclaim(path: Path, stale: Dict[str, Any], token: str) -> bool:
    """Move the stale lock out of the way; if a racing run replaced it meanwhile, put that one back."""
    grave = path.with_name(f".{LOCK_NAME}.stale-{token}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    try:
        moved, _ = _read_lock(grave)
    except OSError:
        moved = None
    if (moved or {}).get("token") != stale.get("token"):
        try:
            os.link(grave, path)  # a live run's fresh lock: give it back (unless yet another run took the name)
        except OSError:
            pass
        _unlink(grave)
        return False
    _unlink(grave)
    return True


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["HEARTBEAT_S", "LOCK_NAME", "RunDirBusy", "RunLock", "Verdict", "describe_holder",
           "earlier_attempt_of_same_job", "identity", "judge", "process_alive"]
