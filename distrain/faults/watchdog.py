"""Hang watchdog: when a collective fails or times out, name the collective, the step and the ranks missing.

torch already knows which collective each rank last issued: its flight recorder (``TORCH_FR_BUFFER_SIZE``)
keeps a per-process-group sequence number and the op's name for NCCL and gloo alike. What no single rank
knows is where the *others* are. So every rank runs a small thread that publishes a heartbeat to the job's
c10d TCPStore - its current step, how long it has been in it, and (once a step runs long) its flight
recorder's last collective per process group. When a rank's collective raises (gloo's timeout after
``dist.timeout_s``, or a peer's connection closing), ``diagnose`` reads every heartbeat and reports the ranks
whose sequence number is behind: those never entered the collective the others are waiting in.

The failing rank then raises the story as a ``DistributedError`` and posts it under ``abort`` in the store.
Every other rank's thread sees that within one heartbeat and ends its own process - a rank stuck outside a
collective (asleep, deadlocked in Python, spinning) would otherwise wait to be SIGKILLed by the launcher. It
waits until a second has passed since the failure so the failing rank's error file carries the earliest
timestamp (torchelastic's "first failure" is decided by whole seconds).

Every store call has a deadline (``distrain.faults.store``): the store lives in one process (rank 0, or the
launcher's agent), and a frozen owner would otherwise block every reader forever. A store silent past
``dist.timeout_s`` is itself the diagnosis: its owner is named, by the failing collective's report or, for a rank
that is not in one, by the heartbeat thread, which then ends the rank.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from distrain.env import ProcessInfo
from distrain.faults.store import BoundedStore, StoreSilent, open_store, read_all, silent_store_story, store_owner
from distrain.errors import DistributedError

FLIGHT_RECORDER_ENV = "TORCH_FR_BUFFER_SIZE"
FLIGHT_RECORDER_ENTRIES = 256  # only the newest entries matter here; a user's own setting wins
ABORT_EXIT_CODE = 1

# gloo raises a plain RuntimeError for a collective that timed out or lost its peer, whose text carries the C++
# source location inside gloo or c10d: "[.../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by
# peer", "[...unbound_buffer.cc:78] Timed out waiting 3000ms for recv" (at the start, or after the TorchScript
# traceback of a DDP comm hook's future that carried it). NCCL and the stores raise Dist* errors.
_COMM_ERROR = re.compile(r"\[[^\]\s]*/(gloo|c10d)/[^\]\s]*:\d+\]")


def enable_flight_recorder() -> None:
    """Ask torch to record collectives (must run before the process group is created)."""
    os.environ.setdefault(FLIGHT_RECORDER_ENV, str(FLIGHT_RECORDER_ENTRIES))


def last_collectives() -> Optional[Dict[str, Dict[str, Any]]]:
    """The newest flight-recorder entry per process group: {pg: {seq, op, ranks}}, or None without a recorder."""
    try:
        # lazy: start-up: torch takes seconds to import
        from torch._C._distributed_c10d import _dump_fr_trace  # private, hence the broad guard

        dump = pickle.loads(_dump_fr_trace(True, False, False))
    except Exception:
        return None
    members = {name: cfg.get("ranks") for name, cfg in (dump.get("pg_config") or {}).items()}
    out: Dict[str, Dict[str, Any]] = {}
    for entry in dump.get("entries") or []:
        if entry.get("is_p2p"):
            continue  # point-to-point ops have their own sequence; collectives are what ranks wait in together
        pg = entry.get("process_group") or ("?", "?")
        name, desc = str(pg[0]), str(pg[1])
        seq = int(entry.get("collective_seq_id") or 0)
        if seq >= out.get(name, {}).get("seq", -1):
            out[name] = {"seq": seq, "op": str(entry.get("profiling_name") or "?"), "desc": desc,
                         "ranks": _parse_ranks(members.get(name))}
    return out


def _parse_ranks(value: Any) -> Optional[List[int]]:
    """pg_config lists a group's global ranks as a string like "[0, 1]" (or "all"); None when unknown."""
    if isinstance(value, (list, tuple)):
        return [int(r) for r in value]
    if isinstance(value, str) and value.startswith("["):
        try:
            return [int(r) for r in json.loads(value)]
        except (ValueError, TypeError):
            return None
    return None


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` was raised by the communication layer: a collective that timed out or lost a peer.

    Only torch's own distributed errors and gloo's/c10d's C++ exceptions count; a RuntimeError of the user's code
    that merely mentions a timeout, a socket or a peer is not a stuck collective.
    """
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    return isinstance(err, RuntimeError) and bool(_COMM_ERROR.search(str(err)))


@dataclass
class Heartbeat:
    rank: int
    host: str
    pid: int
    step: int  # steps completed when the current one began (the current step is step + 1)
    step_age_s: float  # how long this rank has been in the current step
    time: float  # wall clock when published
    collectives: Optional[Dict[str, Dict[str, Any]]] = field(default=None)


class Watchdog:
    """One rank's heartbeat thread, and the post-mortem that names the ranks a failed collective waited for."""

    def __init__(self, info: ProcessInfo, timeout_s: float, log: logging.Logger, interval_s: Optional[float] = None):
        self.info = info
        self.timeout_s = timeout_s
        self.log = log
        # Often enough that every rank publishes its flight recorder well inside one timeout.
        self.interval_s = interval_s or min(5.0, max(0.25, timeout_s / 10))
        self._step = 0
        self._step_started = time.monotonic()
        self._store: Optional[BoundedStore] = None  # one client, every call on its own thread, under a deadline
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store_failures = 0

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> bool:
        """Connect to the job's store and start the heartbeat thread; False (and a log line) if there is no store."""
        self._store = open_store(self.info, self.timeout_s)
        if self._store is None:
            self.log.warning("watchdog: no c10d store to publish heartbeats to (none, or it did not answer); a stuck "
                             "collective will be reported without naming the ranks that did not arrive")
            return False
        try:
            self._publish()  # before training starts, so every rank has a heartbeat from the start
        except Exception as err:
            self.log.warning(f"watchdog: the job's store does not answer ({type(err).__name__}: {err})")
        self._thread = threading.Thread(target=self._run, name="distrain-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None

    @property
    def step(self) -> int:
        """Steps this rank had completed when its current step began."""
        return self._step

    def step_age(self) -> float:
        """Seconds since this rank began its current step (or since the last step began, after training)."""
        return time.monotonic() - self._step_started

    def step_started(self, completed: int) -> None:
        """Called by the loop at the top of every step: two attribute writes, nothing else."""
        self._step_started = time.monotonic()
        self._step = completed

    # --- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                abort = self._read_abort()
                self._store_failures = 0
            except Exception as err:  # the store's host (rank 0, or the agent) has gone or is silent
                self._store_trouble(err)
                continue
            if abort and abort.get("rank") != self.info.rank:
                self._acknowledge()
                # Let a whole second pass since the failure, so the failing rank's error file is the earliest;
                # if this rank's own main thread ends the run meanwhile (stop()), it reports for itself.
                if self._stop.wait(max(0.0, float(abort.get("time", 0)) + 1.5 - time.time())):
                    return
                self._exit(f"rank {abort.get('rank')} failed: {abort.get('message')}")

    def _store_trouble(self, err: Exception) -> None:
        """A store that refuses or drops the connection has gone (its owner ended): say so once and carry on - the
        launcher ends a job whose rank died, and this rank may be doing useful work after training. A store that
        stays *silent* past dist.timeout_s has a frozen owner: no collective can finish either, so end this rank
        and name it (the main thread, if it is in a collective, names it first when that times out)."""
        self._store_failures += 1
        if self._store_failures == 1:
            self.log.warning(f"watchdog: the job's store does not answer ({type(err).__name__}: {err})")
        silent_s = self._store.silent_for() if self._store is not None else 0.0
        if isinstance(err, StoreSilent) and silent_s > self.timeout_s and store_owner()[0] != self.info.rank:
            self._exit(f"{silent_store_story(silent_s, self.timeout_s)} (this rank was in step {self._step + 1})")

    def _exit(self, reason: str) -> None:
        """End this process now: the job has failed elsewhere and this rank may be stuck where it cannot see it."""
        message = f"rank {self.info.rank} is stopping because {reason}"
        self.log.error(message)
        for handler in self.log.handlers:
            handler.flush()
        _record_error_file(message)
        os._exit(ABORT_EXIT_CODE)  # not sys.exit: the main thread may be blocked in C++ and never unwind

    def _heartbeat(self) -> Heartbeat:
        age = time.monotonic() - self._step_started
        # The flight recorder costs a dump; it only matters once a step runs long (something may be stuck).
        collectives = last_collectives() if age >= self.interval_s else None
        return Heartbeat(rank=self.info.rank, host=socket.gethostname(), pid=os.getpid(), step=self._step,
                         step_age_s=round(age, 3), time=time.time(), collectives=collectives)

    def _publish(self) -> None:
        beat = self._heartbeat()
        self._store.call("set", f"hb/{self.info.rank}", json.dumps(vars(beat)))

    def _read_abort(self) -> Optional[Dict[str, Any]]:
        if not self._store.call("check", ["abort"]):
            return None
        return json.loads(self._store.call("get", "abort"))

    # --- the post-mortem ---------------------------------------------------------------------------
    def diagnose(self, err: BaseException, completed: int) -> Optional[str]:
        """If ``err`` is a failed collective, a paragraph naming it, the step and the ranks that did not arrive.

        Also posts the paragraph under ``abort`` so every other rank ends promptly. None for other errors.
        """
        if not is_communication_error(err) or self._store is None:
            return None
        me = self._heartbeat()
        me.collectives = last_collectives()  # fresh, whatever the step's age
        beats = self._read_heartbeats()
        beats[self.info.rank] = me
        silent_s = self._store.silent_for()
        if silent_s > self._store.deadline_s and store_owner()[0] != self.info.rank:  # a frozen owner: it is the story
            message = explain_silent_store(err, completed, silent_s, self.timeout_s)
        elif (failed := self._await_peer_failure()) is not None:  # a rank failed by itself and said why: its words
            message = explain_peer_failure(err, self.info.rank, failed, self.timeout_s)
        else:
            beats = {**self._read_heartbeats(), self.info.rank: me}  # fresher: a failed peer posts its last step
            message = explain(err, completed, beats, self.info.world_size, self.timeout_s, self.interval_s,
                              me=self.info.rank)
        self.post_abort(message, beats, wait=True, own_failure=False)
        return message

    def post_abort(self, message: str, beats: Optional[Dict[int, Optional[Heartbeat]]] = None,
                   wait: bool = False, own_failure: bool = True) -> None:
        """Tell every rank's watchdog that this job has failed (first poster wins): this rank's own error
        (``own_failure``), or a failed collective's diagnosis.

        With ``wait``, a rank whose process hosts the store (rank 0 under srun, or under torchrun without the
        agent's store) then waits, briefly, until the live ranks have read it: the store ends with this process.
        """
        if self._store is None:
            return
        try:
            self._publish()  # this rank's step as of now: a peer's post-mortem reads it (the last beat may be old)
            first = self._store.call("add", "abort/count", 1) == 1
            if first:
                self._store.call("set", "abort", json.dumps({"rank": self.info.rank, "time": time.time(),
                                                             "message": message, "own": own_failure}))
            if wait and first and self.info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                beats = beats if beats is not None else self._read_heartbeats()
                alive = sum(1 for r, b in beats.items() if r != self.info.rank and not (b and _process_gone(b)))
                deadline = time.monotonic() + 2 * self.interval_s + 1
                while time.monotonic() < deadline and self._acknowledged() < alive:
                    time.sleep(0.05)
        except Exception as store_err:  # the store may be what failed
            self.log.warning(f"watchdog: could not post the abort to the store: {store_err}")

    def _await_peer_failure(self) -> Optional[Dict[str, Any]]:
        """``_peer_failure``, given a moment: a rank that failed by itself posts its own paragraph just before it
        exits, and its peers' collective can fail on the closed connection first (seen under load)."""
        deadline = time.monotonic() + min(2.0, self.interval_s)
        while (failed := self._peer_failure()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return failed

    def _peer_failure(self) -> Optional[Dict[str, Any]]:
        """The abort another rank posted for an error of its own (not a collective it saw fail), if any."""
        try:
            abort = self._read_abort()
        except Exception:  # the store is gone or silent: the heartbeats (or their absence) tell the rest
            return None
        return abort if abort and abort.get("own") and abort.get("rank") != self.info.rank else None

    def _acknowledge(self) -> None:
        self._store.call("add", "abort/acks", 1)

    def _acknowledged(self) -> int:
        """Ranks that know of the abort: those that acknowledged it, and the other ranks that posted one."""
        return int(self._store.call("add", "abort/acks", 0)) + int(self._store.call("add", "abort/count", 0)) - 1

    def _read_heartbeats(self) -> Dict[int, Optional[Heartbeat]]:
        """rank -> its heartbeat, or None when it never published one. A rank whose heartbeat could not be read
        (the store stopped answering) is left out: unknown, not missing."""
        raws = read_all(self._store, [f"hb/{rank}" for rank in range(self.info.world_size)])
        return {rank: Heartbeat(**json.loads(raw)) if raw else None for rank, raw in raws.items()}


def explain(err: BaseException, completed: int, beats: Dict[int, Optional[Heartbeat]], world_size: int,
            timeout_s: float, interval_s: float, me: Optional[int] = None) -> str:
    """Turn every rank's heartbeat into one paragraph: which collective, which step, who did not arrive.

    ``beats``: rank -> heartbeat, None for a rank that never published one; a rank absent from it could not be
    read (the store stopped answering) and is never blamed.
    """
    now = time.time()
    stale_after = 3 * interval_s + 2.0
    what, cause = _what_failed(err, timeout_s)

    def where(rank: int) -> str:
        beat = beats.get(rank)
        if rank not in beats:
            return f"rank {rank} (its heartbeat could not be read: the job's store stopped answering)"
        if beat is None:
            return f"rank {rank} (no heartbeat at all: it never started its watchdog, or died early)"
        age = now - beat.time
        if _process_gone(beat):
            return (f"rank {rank} (host {beat.host}, pid {beat.pid}: the process is gone - killed or crashed; its "
                    f"last heartbeat, {age:.1f} s before, was in step {beat.step + 1})")
        seen = f"rank {rank} (host {beat.host}, pid {beat.pid}; in step {beat.step + 1} for {beat.step_age_s:.1f} s"
        if age > stale_after:
            return seen + f" as of its last heartbeat, {age:.0f} s ago: the process is frozen or unreachable)"
        return seen + ")"

    stuck = _missing_ranks(beats, world_size)
    if stuck is not None:
        pg, seq, op, waiting, missing = stuck
        group = "" if pg in ("0", "default_pg") else f" on process group {pg}"
        return (f"Collective {op} (#{seq}{group}) {what} in step {completed + 1}: "
                f"{_ranks(missing)} did not arrive - {'; '.join(where(r) for r in missing)}. "
                f"{_ranks(waiting).capitalize()} {'was' if len(waiting) == 1 else 'were'} waiting in it. "
                f"Look at the missing rank's log (<run dir>/logs/rank{missing[0]}.log). ({cause})")
    # No flight recorder from the others (steps too short to publish it), or every rank issued the collective.
    mine = beats.get(me) if me is not None else None
    latest = max((mine.collectives or {}).items(), key=lambda kv: kv[0] in ("0", "default_pg"), default=None) \
        if mine is not None else None
    name = f"Collective {latest[1]['op']} (#{latest[1]['seq']})" if latest else "A collective"
    known = {r: b for r, b in beats.items() if b is not None}
    behind = sorted(r for r, b in known.items() if b.step < max(x.step for x in known.values())) if known else []
    gone = [r for r, b in known.items() if _process_gone(b)]
    silent = [r for r in beats if beats[r] is None or now - beats[r].time > stale_after]
    suspects = sorted(set(gone) | set(silent)) or behind
    if suspects:
        return (f"{name} {what} in step {completed + 1}: {_ranks(suspects)} did not arrive - "
                f"{'; '.join(where(r) for r in suspects)}. Look at the missing rank's log "
                f"(<run dir>/logs/rank{suspects[0]}.log). ({cause})")
    unread = [r for r in range(world_size) if r not in beats]
    if unread:
        return (f"{name} {what} in step {completed + 1}. The job's store stopped answering while the ranks' "
                f"heartbeats were read, so {_ranks(unread)} could not be checked; the ranks that could were all "
                f"in it ({'; '.join(where(r) for r in sorted(known)) or 'none'}). Look at every rank's log "
                f"(<run dir>/logs/). ({cause})")
    return (f"{name} {what} in step {completed + 1}, although every rank entered it "
            f"({'; '.join(where(r) for r in sorted(known))}): the network between the ranks, or the "
            f"communication backend, is stuck. ({cause})")


def explain_silent_store(err: BaseException, completed: int, silent_s: float, timeout_s: float) -> str:
    """The paragraph for a collective that failed while the job's store (its owner: rank 0) was silent."""
    what, cause = _what_failed(err, timeout_s)
    return f"A collective {what} in step {completed + 1}: {silent_store_story(silent_s, timeout_s)}. ({cause})"


def explain_peer_failure(err: BaseException, me: int, abort: Dict[str, Any], timeout_s: float) -> str:
    """The paragraph for a collective that failed because another rank had failed by itself and posted why: in that
    rank's words, whose step is the one that counts (this rank may already be a collective further)."""
    what, _ = _what_failed(err, timeout_s)
    return f"Rank {me}'s collective {what} because rank {abort.get('rank')} failed: {abort.get('message')}"


def _what_failed(err: BaseException, timeout_s: float) -> tuple:
    """("timed out after dist.timeout_s=N" or "failed", the error's text on one line, at most 240 characters)."""
    timed_out = re.search(r"timed out|timeout", str(err), re.IGNORECASE) is not None
    cause = " ".join(str(err).split())
    return (f"timed out after dist.timeout_s={timeout_s:g}" if timed_out else "failed",
            cause if len(cause) <= 240 else cause[:240] + "...")


def _process_gone(beat: Heartbeat) -> bool:
    """True when the heartbeat's process ran on this host and no longer exists (other hosts: unknown, False)."""
    if beat.host != socket.gethostname():
        return False
    try:
        os.kill(beat.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:  # a killed child stays a zombie until its launcher reaps it: dead all the same
        stat = Path(f"/proc/{beat.pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _missing_ranks(beats: Dict[int, Optional[Heartbeat]], world_size: int):
    """(pg, seq, op, waiting ranks, missing ranks) for the collective some ranks issued and others did not."""
    groups: Dict[str, List[int]] = {}
    for rank, beat in beats.items():
        for pg, mark in ((beat.collectives or {}) if beat else {}).items():
            groups.setdefault(pg, mark.get("ranks") or list(range(world_size)))
    candidates = []
    for pg, members in groups.items():
        seqs: Dict[int, int] = {}
        ops: Dict[int, str] = {}
        for rank in members:
            beat = beats.get(rank)
            if beat is None or beat.collectives is None:
                continue  # unknown, not "behind": it may simply not have published its recorder
            mark = beat.collectives.get(pg, {"seq": 0, "op": "?"})
            seqs[rank] = int(mark["seq"])
            ops[int(mark["seq"])] = mark["op"]
        if not seqs:
            continue
        top = max(seqs.values())
        missing = sorted(r for r in members if r in seqs and seqs[r] < top)
        missing += sorted(r for r in members if r not in seqs and r in beats and beats[r] is None)
        if missing:
            waiting = sorted(r for r, s in seqs.items() if s == top)
            candidates.append((pg, top, ops[top], waiting, sorted(set(missing))))
    # The default group first: it is where the training collectives run.
    candidates.sort(key=lambda c: (c[0] not in ("0", "default_pg"), -c[1]))
    return candidates[0] if candidates else None


def _ranks(ranks: List[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _record_error_file(message: str) -> None:
    """Write torchelastic's error file for this worker (when launched by torchrun), so its summary says why."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        # lazy: start-up: torch takes seconds to import
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler


        ErrorHandler().record_exception(DistributedError(message))
    except Exception:
        pass
