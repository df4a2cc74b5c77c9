"""Two "hosts" on one machine for multi-node tests: two network namespaces joined by a veth pair (root, iproute2)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator, List, Tuple

import pytest


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def veth_pair(tag: str, subnet: str) -> Iterator[List[Tuple[str, str, str]]]:
    """[(namespace, veth, address)] for namespaces ``<tag>n1``/``<tag>n2`` at ``<subnet>.1``/``.2``, removed
    afterwards; skips the test where namespaces cannot be made. ``tag`` keeps concurrent tests apart (<= 9 chars)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (`apt-get install iproute2` provides `ip netns`)")
    hosts = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i}") for i in (1, 2)]
    try:
        for ns, _, _ in hosts:
            made = ip("netns", "add", ns)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
        steps = [("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])]
        for ns, veth, addr in hosts:
            steps += [("link", "set", veth, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", veth),
                      ("-n", ns, "link", "set", veth, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield hosts
    finally:
        for ns, _, _ in hosts:
            ip("netns", "del", ns)  # takes its end of the veth pair, and so the pair, with it
