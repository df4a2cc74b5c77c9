"""The watchdog's client of the job's c10d store, with a deadline on every call.

torch's TCPStore client timeout bounds the wait for a *key*, not for a server that stopped answering: against a
frozen store owner (rank 0 stopped with SIGSTOP or swapping, or a host gone silent behind an open connection)
``get``, ``check``, ``set`` and ``add`` block until it wakes up. Measured with torch 2.13: a client built with
``timeout=3 s`` logged "timed out after 3000ms" and still sat in ``get`` 60 s later, returning only after SIGCONT;
a second client of its own short timeout blocks the same way. So the client is owned by one helper thread that
runs every call, and the caller waits at most a deadline (a bounded join). A call stuck past it marks the store
silent; later calls fail at once until the stuck one returns, so nothing queues behind a dead socket. The client is
built on that thread too: its constructor's handshake blocks against a frozen owner the same way.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as torch_dist
from torch.distributed.distributed_c10d import _get_default_store

from distrain.env import ProcessInfo


class StoreSilent(Exception):
    """The job's store did not answer within the deadline (or is still stuck in an earlier call)."""

    def __init__(self, silent_s: float):
        super().__init__(f"the job's store has not answered for {silent_s:.0f} s")
        self.silent_s = silent_s


class BoundedStore:
    """Runs a store's calls on one daemon thread; each caller waits at most ``deadline_s``.

    A daemon thread, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, and a thread
    blocked in a frozen store would hold the exit forever.
    """

    def __init__(self, store: Any, deadline_s: float):
        self._store = store
        self.deadline_s = deadline_s
        self._calls: "queue.Queue[Tuple[Future, Callable[[], Any]]]" = queue.Queue()
        self._busy_since: Optional[float] = None  # when the call in progress began; None when idle
        self._thread = threading.Thread(target=self._work, name="distrain-store", daemon=True)
        self._thread.start()

    def silent_for(self) -> float:
        """Seconds the call in progress has been waiting for the store (0 when it is idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @classmethod
    def connect(cls, build: Callable[[], Any], deadline_s: float) -> "BoundedStore":
        """A bounded client whose store is built by ``build()`` on the client's thread, within the deadline
        (StoreSilent otherwise): a TCPStore client's handshake with a frozen owner never returns."""
        bounded = cls(None, deadline_s)
        bounded._store = bounded._run(build)
        return bounded

    def call(self, method: str, *args: Any) -> Any:
        """``store.<method>(*args)``, or StoreSilent when it does not return within the deadline."""
        return self._run(lambda: getattr(self._store, method)(*args))

    def _run(self, work: Callable[[], Any]) -> Any:
        """``work()`` on the client's thread; its result, or StoreSilent past the deadline."""
        if self.silent_for() > self.deadline_s:
            raise StoreSilent(self.silent_for())  # still stuck: don't queue behind it
        future: Future = Future()
        self._calls.put((future, work))
        try:
            return future.result(timeout=self.deadline_s)
        except FutureTimeout:
            future.cancel()  # if it has not started, it never will
            raise StoreSilent(max(self.silent_for(), self.deadline_s)) from None

    def _work(self) -> None:
        while True:
            future, work = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            self._busy_since = time.monotonic()
            try:
                future.set_result(work())
            except BaseException as err:  # handed to the caller, who decides what a failed store means
                future.set_exception(err)
            finally:
                self._busy_since = None


def read_all(store: BoundedStore, keys: List[str]) -> Dict[int, Optional[bytes]]:
    """index -> the value of ``keys[index]``, None for a key that is not set; a key after the store stopped
    answering is left out (unknown, not missing).

    Every rank reads every rank's heartbeat after a failed collective: one request per key made W x 2W requests to
    the one store (2 million at 1,024 ranks, while the job is already in trouble). When all keys are set (the
    usual case: every rank publishes before training) it is one check and one multi_get.
    """
    try:
        if store.call("check", keys):
            return dict(enumerate(store.call("multi_get", keys)))
    except Exception:
        return {}  # the store itself is gone or silent
    values: Dict[int, Optional[bytes]] = {}
    for index, key in enumerate(keys):
        try:
            values[index] = store.call("get", key) if store.call("check", [key]) else None
        except Exception:
            break  # gone or silent: waiting on it once per key would only delay the report
    return values


def call_deadline(timeout_s: float) -> float:
    """How long one store call may take: a healthy store answers in milliseconds, a loaded host in a second or
    two; a quarter of dist.timeout_s (2-10 s) leaves time to name a silent owner well within one timeout."""
    return min(10.0, max(2.0, timeout_s / 4))


def store_owner() -> Tuple[Optional[int], str]:
    """Who hosts the job's store: (0, "rank 0") when a worker does (srun, `distrain launch`, torchrun without a
    shared rendezvous store), or (None, "the launcher's agent") when torchrun's agent shares its own."""
    where = f" at {os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')}" if os.environ.get("MASTER_ADDR") \
        else ""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None, f"the launcher's agent on node 0{where}"
    return 0, f"rank 0{where}"


def silent_store_story(silent_s: float, timeout_s: float) -> str:
    """Why the store's silence points at its owner, in words: the clause a report ends with."""
    rank, owner = store_owner()
    who = "rank 0 did not answer" if rank == 0 else f"{owner} did not answer"  # the job cannot go on without it
    return (f"{who} - it hosts the job's c10d store ({owner}), which has not answered for {silent_s:.0f} s "
            f"(dist.timeout_s={timeout_s:g}) although its connection is open - the process is frozen (stopped "
            f"with SIGSTOP, swapping, or stuck in the kernel) or its host is unreachable. Look at "
            f"{'rank 0' if rank == 0 else 'node 0'}'s log (<run dir>/logs/rank0.log) and at that host")


def open_store(info: ProcessInfo, timeout_s: float) -> Optional[BoundedStore]:
    """A client of the job's own c10d TCPStore (torchrun's agent, or rank 0 under srun), namespaced per attempt,
    behind a deadline; None when there is no store to reach."""
    attempt = "-".join(os.environ.get(k, "0") for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "local"
    prefix = f"distrain/watchdog/{run_id}/{attempt}/"  # a restarted group must not read the last attempt's abort
    timeout = datetime.timedelta(seconds=min(30.0, max(5.0, timeout_s)))
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")

    def build() -> Any:
        if host and port:
            store = torch_dist.TCPStore(host, int(port), is_master=False, timeout=timeout, wait_for_workers=False)
        else:
            store = _get_default_store()  # private, but the only way to the group's own store without MASTER_*
        return torch_dist.PrefixStore(prefix, store)

    try:
        return BoundedStore.connect(build, call_deadline(timeout_s))
    except Exception:  # StoreSilent included: no heartbeats, said by the caller; training itself is unaffected
        return None
