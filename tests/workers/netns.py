"""Several "hosts" on one machine for multi-node tests (root, iproute2): two network namespaces joined by a veth
pair, or N namespaces on one bridge (a switch) in a namespace of its own, so the host's network is never touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Iterator, List, Tuple

import pytest


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (`apt-get install iproute2` provides `ip netns`)")


def _add_namespace(ns: str) -> None:
    made = ip("netns", "add", ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")


def _run_steps(steps: List[Tuple[str, ...]]) -> None:
    for step in steps:
        done = ip(*step)
        assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"


@contextlib.contextmanager
def veth_pair(tag: str, subnet: str) -> Iterator[List[Tuple[str, str, str]]]:
    """[(namespace, veth, address)] for namespaces ``<tag>n1``/``<tag>n2`` at ``<subnet>.1``/``.2``, removed
    afterwards; skips the test where namespaces cannot be made. ``tag`` keeps concurrent tests apart (<= 9 chars)."""
    _skip_unless_possible()
    hosts = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i}") for i in (1, 2)]
    try:
        for ns, _, _ in hosts:
            _add_namespace(ns)
        steps = [("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])]
        for ns, veth, addr in hosts:
            steps += [("link", "set", veth, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", veth),
                      ("-n", ns, "link", "set", veth, "up"), ("-n", ns, "link", "set", "lo", "up")]
        _run_steps(steps)
        yield hosts
    finally:
        for ns, _, _ in hosts:
            ip("netns", "del", ns)  # takes its end of the veth pair, and so the pair, with it


@contextlib.contextmanager
def bridged_hosts(tag: str, subnet: str, count: int) -> Iterator[List[Tuple[str, str, str]]]:
    """[(namespace, veth, address)] for ``count`` namespaces ``<tag>n1``... at ``<subnet>.1``..., each joined by a
    veth pair to one bridge in the namespace ``<tag>sw`` (the switch); all removed afterwards. Skips the test
    where namespaces cannot be made. ``tag`` keeps concurrent tests apart (<= 9 characters)."""
    _skip_unless_possible()
    switch = f"{tag}sw"
    hosts = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i}") for i in range(1, count + 1)]
    try:
        for ns in [switch] + [ns for ns, _, _ in hosts]:
            _add_namespace(ns)
        steps = [("-n", switch, "link", "add", "br0", "type", "bridge"), ("-n", switch, "link", "set", "br0", "up")]
        for i, (ns, veth, addr) in enumerate(hosts, start=1):
            port = f"{tag}p{i}"  # the switch's end; both ends are made in the switch, then one moves to the host
            steps += [("-n", switch, "link", "add", port, "type", "veth", "peer", "name", veth),
                      ("-n", switch, "link", "set", veth, "netns", ns),
                      ("-n", switch, "link", "set", port, "master", "br0"), ("-n", switch, "link", "set", port, "up"),
                      ("-n", ns, "addr", "add", f"{addr}/24", "dev", veth), ("-n", ns, "link", "set", veth, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        _run_steps(steps)
        yield hosts
    finally:
        for ns in [ns for ns, _, _ in hosts] + [switch]:
            ip("netns", "del", ns)


def kill_namespace(ns: str) -> List[int]:
    """SIGKILL every process in namespace ``ns`` (a whole "host" lost at once); returns their PIDs."""
    pids = [int(pid) for pid in ip("netns", "pids", ns).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # ended by itself meanwhile
    return pids
