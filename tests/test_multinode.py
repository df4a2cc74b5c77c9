"""Two "hosts" for real: two network namespaces joined by a veth pair, one `distrain launch` node in each,
rendezvous over c10d at 10.231.0.1 and gloo traffic across the veth. Marked ``multinode`` (run with
``-m multinode``; needs root and iproute2).

The two-node run must end on the same parameters as a single-node run with the same world size (2).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from netns import ip, veth_pair
from fault_helpers import (FAST, PYTHON, QUICKSTART, REPO, STEPS, load_weights, max_rel_diff, processes_mentioning,
                           reference_weights, worker_env)

pytestmark = pytest.mark.multinode

SUBNET = "10.231.0"  # addresses exist only inside the test's own namespaces
PORT = 29400


@pytest.fixture
def two_hosts():
    """[(namespace, veth, address)] for two namespaces joined by a veth pair; removed afterwards."""
    with veth_pair(f"dt{os.getpid() % 100000}", SUBNET) as hosts:
        yield hosts


def tx_bytes(ns: str, veth: str) -> int:
    """Bytes the namespace has sent through its end of the veth pair."""
    shown = ip("-j", "-s", "-n", ns, "link", "show", "dev", veth)
    return int(json.loads(shown.stdout)[0]["stats64"]["tx"]["bytes"])


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> dict:
    """Final weights of the same run on one node with the same world size (2)."""
    return reference_weights(tmp_path_factory.mktemp("single"))


def distrain_launch_node(rank: int, addr: str, run_dir: Path) -> list:
    return [PYTHON, "-m", "distrain", "launch", "--nnodes", "2", "--node-rank", str(rank), "--local-addr", addr,
            "--nproc-per-node", "1", "--rdzv-endpoint", f"{SUBNET}.1:{PORT}", QUICKSTART, *FAST,
            f"run.dir={run_dir}"]


def torchrun_script_node(rank: int, addr: str, run_dir: Path) -> list:
    return ["env", "NNODES=2", f"NODE_RANK={rank}", "NPROC_PER_NODE=1", f"MASTER_ADDR={SUBNET}.1",
            f"MASTER_PORT={PORT}", f"LOCAL_ADDR={addr}", f"DISTRAIN_PYTHON={PYTHON}",
            str(REPO / "launch" / "torchrun.sh"), QUICKSTART, *FAST, f"run.dir={run_dir}"]


@pytest.mark.parametrize("node_command", [distrain_launch_node, torchrun_script_node],
                         ids=["distrain-launch", "launch-torchrun.sh"])
def test_two_namespaces_match_the_single_node_run(two_hosts, single_node, tmp_path, node_command):
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    nodes = []
    for rank, (ns, veth, addr) in enumerate(two_hosts):
        cmd = ["ip", "netns", "exec", ns, *node_command(rank, addr, run_dir)]
        env = worker_env(out, GLOO_SOCKET_IFNAME=veth)  # gloo binds the veth, not the namespace's loopback
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    assert processes_mentioning(str(run_dir)) == []

    weights = load_weights(out, STEPS)
    diff = max_rel_diff(single_node, weights)
    param_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    sent = [tx_bytes(ns, veth) for ns, veth, _ in two_hosts]
    print(f"two namespaces vs one node: max relative difference {diff:.3e}; bytes sent over the veth {sent}")
    assert diff <= 1e-5
    # Every step all-reduces every gradient between the two "hosts": that traffic crossed the veth pair.
    assert min(sent) > STEPS * param_bytes, (sent, param_bytes)


def test_node_0_alone_says_what_it_waits_for_and_gives_up_in_one_paragraph(two_hosts, tmp_path):
    """Node 1 never starts: node 0 (its own "host") names the rendezvous and the join timeout at once, shows
    progress while it waits, and ends with one paragraph and exit 1 when the timeout passes, no traceback."""
    ns, veth, addr = two_hosts[0]
    cmd = ["ip", "netns", "exec", ns, *distrain_launch_node(0, addr, tmp_path / "runs")]
    cmd[cmd.index(QUICKSTART):cmd.index(QUICKSTART)] = ["--join-timeout", "5"]
    proc = subprocess.run(cmd, env=worker_env(tmp_path / "out", GLOO_SOCKET_IFNAME=veth), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RendezvousTimeoutError" not in proc.stderr, proc.stderr[-3000:]
    endpoint = f"{SUBNET}.1:{PORT}"
    lines = proc.stderr.splitlines()
    assert f"distrain launch: waiting for the other 1 node at the rendezvous {endpoint}, for up to 5 s " \
           f"(--join-timeout)" in lines, proc.stderr
    assert sum(line.startswith("distrain launch: still waiting") for line in lines) >= 2, proc.stderr
    assert f"The rendezvous at {endpoint} did not complete within --join-timeout 5 s" in " ".join(proc.stderr.split())
