"""Waiting for the other nodes of a multi-node launch: say where and for how long, show progress, explain a timeout.

torchrun's c10d rendezvous waits silently for ``join_timeout`` (600 s by default) and then raises a bare
RendezvousTimeoutError. ``WaitingForNodes`` prints what this node waits for when the wait starts, a progress line
every so often until every node has joined, and ``timeout_message`` turns the timeout into one paragraph.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Optional, TextIO, Tuple

from distrain.errors import UsageError

# torch's dynamic rendezvous logs "The node ... has joined round N of the rendezvous ..." (INFO) on success.
RENDEZVOUS_LOGGER = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
DEFAULT_JOIN_TIMEOUT_S = 600  # torch's own default


def node_range(nodes: str, flag: str) -> Tuple[int, int]:
    """``N`` or an elastic ``MIN:MAX`` node count (``flag``: the option it came from) as (least, most)."""
    low, _, high = nodes.partition(":")
    try:
        least, most = int(low), int(high or low)
    except ValueError:
        raise UsageError(f"{flag} {nodes!r} is not a number or a MIN:MAX range (e.g. 2 or 1:4).") from None
    if least < 1 or most < least:
        raise UsageError(f"{flag} {nodes} is not allowed: it must be at least 1, and MIN <= MAX.")
    return least, most


def progress_interval(join_timeout_s: float) -> float:
    """Seconds between progress lines: about ten lines over the whole wait, at least one every 60 s."""
    return min(60.0, max(1.0, join_timeout_s / 10))


class _JoinedFilter(logging.Filter):
    """On torch's rendezvous logger: notices the "has joined round" record, and lets through only what the
    logger's own level would have (its level is lowered to INFO to see that record at all)."""

    def __init__(self, joined: threading.Event, wake: threading.Event, level: int):
        super().__init__()
        self.joined, self.wake, self.level = joined, wake, level

    def filter(self, record: logging.LogRecord) -> bool:
        if "has joined round" in record.getMessage():
            self.joined.set()
            self.wake.set()
        return record.levelno >= self.level


class WaitingForNodes:
    """Context manager around torchrun's agent: the start line, progress lines until the rendezvous completes."""

    def __init__(self, nnodes: str, endpoint: str, join_timeout_s: float, hosts_store: bool = True,
                 out: Optional[TextIO] = None):
        self.nnodes, self.endpoint, self.join_timeout_s = nnodes, endpoint, join_timeout_s
        # A node other than node 0 first connects to node 0's store, which torch retries on its own clock (about
        # three minutes); only then does the join timeout run.
        self.hosts_store = hosts_store
        self.out = out or sys.stderr
        self.joined = threading.Event()
        self._done = threading.Event()
        self._wake = threading.Event()  # set when every node has joined, or when the launch ends
        self._logger = logging.getLogger(RENDEZVOUS_LOGGER)
        self._level = self._logger.level
        self._filter = _JoinedFilter(self.joined, self._wake, self._logger.getEffectiveLevel())
        self._thread: Optional[threading.Thread] = None

    def _say(self, text: str) -> None:
        print(f"distrain launch: {text}", file=self.out, flush=True)

    def __enter__(self) -> "WaitingForNodes":
        others = _others(self.nnodes)
        first = "" if self.hosts_store else "connecting to node 0's rendezvous store, then "
        self._say(f"{first}waiting for {others} at the rendezvous {self.endpoint}, for up to "
                  f"{self.join_timeout_s:g} s (--join-timeout)")
        self._logger.addFilter(self._filter)
        self._logger.setLevel(min(logging.INFO, self._filter.level))  # the record is INFO: let it be made
        self._thread = threading.Thread(target=self._progress, name="distrain-rendezvous-wait", daemon=True)
        self._thread.start()
        return self

    def _progress(self) -> None:
        started = time.monotonic()
        interval = progress_interval(self.join_timeout_s)
        while True:
            self._wake.wait(interval)
            if self.joined.is_set():
                self._say("every node has joined; the workers start")
                return
            if self._done.is_set():
                return
            waited = time.monotonic() - started
            if not self.hosts_store:
                self._say(f"still waiting for {_others(self.nnodes)} at {self.endpoint}: {waited:.0f} s")
            elif waited < self.join_timeout_s:
                self._say(f"still waiting for {_others(self.nnodes)} at {self.endpoint}: {waited:.0f} s of "
                          f"{self.join_timeout_s:g} s")

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._logger.removeFilter(self._filter)
        self._logger.setLevel(self._level)


def _others(nnodes: str) -> str:
    """'the other 1 node' for --nnodes 2; 'the other nodes (2 to 4 in all)' for an elastic range 2:4."""
    low, _, high = nnodes.partition(":")
    if not high or high == low:
        count = int(low) - 1
        return f"the other {count} node{'s' if count != 1 else ''}"
    return f"the other nodes ({low} to {high} in all)"


def timeout_message(nnodes: str, endpoint: str, join_timeout_s: float, node_rank: Optional[int],
                    detail: str) -> str:
    """One paragraph for a rendezvous that did not complete: what was expected, and what to check."""
    me = f"node {node_rank}" if node_rank is not None else "this node"
    return (f"The rendezvous at {endpoint} did not complete within --join-timeout {join_timeout_s:g} s: {me} waited "
            f"for {_others(nnodes)} (--nnodes {nnodes}), which did not arrive. Start `distrain launch` on every node "
            f"with the same --nnodes and --rdzv-endpoint (node 0 with --node-rank 0 hosts it), check that "
            f"{endpoint} is reachable from each node (firewall, address), or raise --join-timeout to wait longer."
            + (f" (torch: {' '.join(detail.split())[:200]})" if detail.strip() else ""))
