"""The watchdog's post-mortem as pure functions: which errors are stuck collectives, and whom a failure blames.

tests/test_faults.py stalls and kills real ranks; these feed ``explain`` the heartbeats such runs leave, including
the ones a real run cannot be steered into on demand (a store that stops answering half-way through the read).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as torch_dist

from distrain.env import ProcessInfo
from distrain.faults.store import BoundedStore, StoreSilent, call_deadline, open_store, read_all
from distrain.faults.watchdog import Heartbeat, _missing_ranks, explain, is_communication_error
from distrain.ports import free_port
from counting import CountingReads

# The texts gloo raised in a real 2-rank job (torch 2.13): a peer that never entered all_reduce, a peer that died.
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "3000ms for recv operation to complete")
GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:60060. This is typically caused by a remote worker crashing.")
HOST = socket.gethostname()


def beat(rank: int, step: int = 4, age: float = 0.5, seq=None, op: str = "ALLREDUCE", ago: float = 0.1) -> Heartbeat:
    """A fresh heartbeat of a live process (this test's own pid, so it is never "gone")."""
    collectives = None if seq is None else {"0": {"seq": seq, "op": op, "desc": "default_pg", "ranks": None}}
    return Heartbeat(rank=rank, host=HOST, pid=os.getpid(), step=step, step_age_s=age, time=time.time() - ago,
                     collectives=collectives)


# --- what counts as a stuck collective --------------------------------------------------------------------------
@pytest.mark.parametrize("text", [GLOO_TIMEOUT, GLOO_PEER_GONE])
def test_gloos_own_errors_are_communication_errors(text):
    assert is_communication_error(RuntimeError(text))


def test_torchs_distributed_errors_are_communication_errors():
    import torch.distributed as torch_dist

    assert is_communication_error(torch_dist.DistBackendError("NCCL watchdog: collective timed out"))
    assert is_communication_error(torch_dist.DistStoreError("wait timeout"))


@pytest.mark.parametrize("text", ["timeout while reading the next shard from s3", "socket closed by my data server",
                                  "the peer review model failed", "Timed out waiting for the GPU lock"])
def test_a_users_error_that_mentions_a_timeout_or_a_socket_is_not_a_stuck_collective(text):
    assert not is_communication_error(RuntimeError(text))
    assert not is_communication_error(ValueError(GLOO_TIMEOUT))  # gloo raises RuntimeError, nothing else


def test_gloos_error_carried_by_a_ddp_comm_hooks_future_is_a_communication_error():
    """A DDP comm hook's future re-raises gloo's error after the TorchScript traceback of the hook."""
    text = ("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent "
            "call last):\n  /work/distrain/strategies/comm_hooks.py(22): <lambda>\nRuntimeError: " + GLOO_TIMEOUT)
    assert is_communication_error(RuntimeError(text))


# --- whom a failure blames ----------------------------------------------------------------------------------------
def test_the_rank_behind_in_the_collective_sequence_is_named():
    beats = {0: beat(0, seq=12), 1: beat(1, seq=12), 2: beat(2, seq=11, age=9.0)}
    assert _missing_ranks(beats, 3) == ("0", 12, "ALLREDUCE", [0, 1], [2])
    message = explain(RuntimeError(GLOO_TIMEOUT), 4, beats, 3, timeout_s=3, interval_s=0.5, me=0)
    assert message.startswith("Collective ALLREDUCE (#12) timed out after dist.timeout_s=3 in step 5: rank 2 did "
                              "not arrive")
    assert "Ranks 0, 1 were waiting in it" in message and "logs/rank2.log" in message


def test_a_rank_that_never_published_a_heartbeat_is_named_as_such():
    beats = {0: beat(0, seq=7), 1: None}
    message = explain(RuntimeError(GLOO_PEER_GONE), 2, beats, 2, timeout_s=30, interval_s=1, me=0)
    assert "rank 1 (no heartbeat at all" in message and message.startswith("Collective ALLREDUCE (#7) failed")


def test_ranks_the_store_could_not_return_are_not_blamed():
    """The store stopped answering after rank 0's heartbeat: ranks 1 and 2 are unknown, not "never started"."""
    beats = {0: beat(0, seq=12)}  # 1 and 2 could not be read
    assert _missing_ranks(beats, 3) is None
    message = explain(RuntimeError(GLOO_TIMEOUT), 4, beats, 3, timeout_s=3, interval_s=0.5, me=0)
    assert "no heartbeat at all" not in message and "did not arrive" not in message
    assert "store stopped answering" in message and "ranks 1, 2 could not be checked" in message


def test_an_unread_rank_is_not_blamed_when_another_rank_really_is_missing():
    beats = {0: beat(0, seq=12), 1: None}  # 1 never published; 2 could not be read
    message = explain(RuntimeError(GLOO_TIMEOUT), 4, beats, 3, timeout_s=3, interval_s=0.5, me=0)
    assert "rank 1 did not arrive" in message and "rank 2" not in message


def test_a_frozen_rank_is_named_by_its_stale_heartbeat():
    beats = {0: beat(0), 1: beat(1, ago=60.0)}  # short steps: no flight recorder published
    message = explain(RuntimeError(GLOO_TIMEOUT), 9, beats, 2, timeout_s=3, interval_s=0.5, me=0)
    assert message.startswith("A collective timed out after dist.timeout_s=3 in step 10: rank 1 did not arrive")
    assert "frozen or unreachable" in message


def test_every_rank_in_the_collective_blames_the_network_not_a_rank():
    beats = {0: beat(0, seq=5), 1: beat(1, seq=5)}
    message = explain(RuntimeError(GLOO_TIMEOUT), 0, beats, 2, timeout_s=3, interval_s=0.5, me=0)
    assert "although every rank entered it" in message and "did not arrive" not in message


# --- a store whose owner is frozen ------------------------------------------------------------------------------
def _store_owner(port: int) -> subprocess.Popen:
    """A child process hosting a real TCPStore on ``port`` (key k = v)."""
    return subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d; "
                             f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); "
                             "s.set('k', 'v'); time.sleep(600)"])


def _client_once_up(port: int) -> torch_dist.TCPStore:
    deadline = time.monotonic() + 60
    while True:
        try:
            return torch_dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=2))
        except Exception:
            assert time.monotonic() < deadline, "the store never came up"
            time.sleep(0.2)


def test_a_call_to_a_frozen_store_ends_at_its_deadline_and_later_calls_fail_at_once():
    """A real TCPStore hosted by a child process, stopped with SIGSTOP: torch's own client timeout does not end a
    get (it waits for the owner to wake up); the bounded client gives up after its deadline, then fails at once."""
    port = free_port()
    owner = _store_owner(port)
    try:
        store = BoundedStore(_client_once_up(port), deadline_s=1.0)
        assert store.call("get", "k") == b"v"
        os.kill(owner.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(StoreSilent):
            store.call("get", "k")
        assert time.monotonic() - started < 3
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(StoreSilent) as info:
            store.call("check", ["k"])
        assert time.monotonic() - started < 0.5 and info.value.silent_s >= 2  # not queued behind the stuck call
        os.kill(owner.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while store.silent_for() > 0 and time.monotonic() < deadline:  # the stuck get returns once it wakes
            time.sleep(0.1)
        assert store.call("get", "k") == b"v"
    finally:
        os.kill(owner.pid, signal.SIGCONT)
        owner.kill()
        owner.wait()


def test_the_watchdog_connecting_to_a_frozen_store_owner_gives_up_at_its_deadline(monkeypatch):
    """Rank 0 frozen before the watchdog starts: building the TCPStore client (its handshake) must not block the
    rank; open_store gives up within its call deadline and the watchdog runs without heartbeats."""
    port = free_port()
    owner = _store_owner(port)
    try:
        _client_once_up(port)
        os.kill(owner.pid, signal.SIGSTOP)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        info = ProcessInfo(rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                           master_port=port, source="torchelastic")
        opened: list = []
        started = time.monotonic()
        opener = threading.Thread(target=lambda: opened.append(open_store(info, timeout_s=4)), daemon=True)
        opener.start()
        opener.join(timeout=call_deadline(4) + 10)
        assert not opener.is_alive(), "open_store blocked on a frozen store owner"
        assert time.monotonic() - started < call_deadline(4) + 5
        # None when the handshake waits for the owner's reply (torch 2.13 usually does), else a bounded client
        assert len(opened) == 1 and (opened[0] is None or isinstance(opened[0], BoundedStore))
    finally:
        os.kill(owner.pid, signal.SIGCONT)  # the handshake completes, so no thread is inside torch at our exit
        time.sleep(2)
        owner.kill()
        owner.wait()


def test_every_heartbeat_is_read_in_two_requests_not_two_per_rank():
    """After a failed collective every rank reads every rank's heartbeat: one request per key was W x 2W requests
    to the one store (2 million at 1,024 ranks). With every key set it is one check and one multi_get; a rank
    that never published is still told apart (None), at the old cost."""
    world = 64
    server = torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=5))
    keys = [f"hb/{rank}" for rank in range(world)]
    for rank in range(world - 1):
        server.set(keys[rank], f"beat {rank}")
    counted = CountingReads(server)  # a real TCPStore, its requests counted
    partial = read_all(BoundedStore(counted, deadline_s=5.0), keys)
    assert partial[world - 1] is None and partial[3] == b"beat 3" and len(partial) == world
    server.set(keys[world - 1], "last")
    counted.reads = 0
    values = read_all(BoundedStore(counted, deadline_s=5.0), keys)
    assert [values[r] for r in range(world)] == [f"beat {r}".encode() for r in range(world - 1)] + [b"last"]
    assert counted.reads == 2
