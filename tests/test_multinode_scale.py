"""Four "hosts" for real, four ranks each (W = 16): network namespaces on one bridge, one `distrain launch` agent
per namespace, joined by torchrun's elastic c10d rendezvous with ``--nnodes 3:4``. Marked ``multinode`` (run with
``-m multinode``; needs root and iproute2; about 5 minutes on 2 busy cores).

The job trains and checkpoints at W=16; then a whole node is lost (kill -9 of every process in its namespace, its
agent included), the three survivors re-rendezvous and go on at W=12 from the last checkpoint; then the node's
agent is started again, the job re-rendezvouses at W=16 and runs to the end. The data split is a pure function of
the global step (the global batch stays 48 at any W), so the final parameters must equal an uninterrupted 2-rank
run's on the same samples. Node 0 is never the one lost: its agent hosts the rendezvous store (--rdzv-endpoint),
as the first node of a real job does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List

import pytest

from fault_helpers import (DELAY_ENV, FAST, PYTHON, QUICKSTART, SLOW_ENV, launch_command, load_weights,
                           max_rel_diff, processes_mentioning, run_json, steps_logged, wait_until, worker_env)
from netns import bridged_hosts, kill_namespace

pytestmark = pytest.mark.multinode

SUBNET = "10.233.0"  # addresses exist only inside the test's own namespaces
PORT = 29400
NODES, PER_NODE = 4, 4
STEPS = 60
EVERY = 5
# A tiny MLP; global batch 48 splits evenly at W = 16 (3 per rank) and W = 12 (4 per rank), and at W = 2.
OVERRIDES = [f"train.steps={STEPS}", "train.global_batch=48", "train.micro_batch=null", f"checkpoint.every={EVERY}",
             "model.name=mlp", "model.kwargs.hidden=16", "model.kwargs.depth=1", "dist.timeout_s=300"]
DELAY_S = "0.2"  # per step, so that the loss lands mid-run
SLOW_S = "3"  # more per step while the test waits for the lost node's agent to start again and join


@pytest.fixture
def four_hosts():
    with bridged_hosts(f"ds{os.getpid() % 10000}", SUBNET, NODES) as hosts:
        yield hosts


def node_command(rank: int, addr: str, run_dir: Path) -> list:
    return [PYTHON, "-m", "distrain", "launch", "--nnodes", f"{NODES - 1}:{NODES}", "--node-rank", str(rank),
            "--local-addr", addr, "--nproc-per-node", str(PER_NODE), "--rdzv-endpoint", f"{SUBNET}.1:{PORT}",
            "--max-restarts", "3", "--monitor-interval", "1", "--join-timeout", "600", QUICKSTART, *FAST,
            f"run.dir={run_dir}", *OVERRIDES]


def start_node(hosts: list, rank: int, run_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    ns, veth, addr = hosts[rank]
    slow = f"{log.parent / 'slow'}:{SLOW_S}"
    env = worker_env(out, GLOO_SOCKET_IFNAME=veth, **{DELAY_ENV: DELAY_S, SLOW_ENV: slow})  # gloo: the bridge's veth
    with open(log, "a") as sink:
        return subprocess.Popen(["ip", "netns", "exec", ns, *node_command(rank, addr, run_dir)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT, text=True)


def committed_steps(run_dir: Path) -> List[int]:
    root = run_dir / "quickstart" / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "manifest.json").exists())


def attempts(run_dir: Path) -> list:
    try:
        return run_json(run_dir).get("attempts", [])
    except (OSError, ValueError):
        return []  # not written yet, or caught mid-write


def training_at(run_dir: Path, world: int) -> bool:
    """An attempt at ``world`` ranks has started and logged a step past its start."""
    at = [a for a in attempts(run_dir) if a.get("world_size") == world]
    return bool(at) and steps_logged(run_dir) > at[-1]["start_step"]


def tails(logs: List[Path]) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-2500:]}" for log in logs if log.exists())


def test_four_nodes_lose_one_go_on_exactly_and_grow_back(four_hosts, tmp_path):
    ref = tmp_path / "ref"
    proc = subprocess.run(launch_command(2, ref / "runs", OVERRIDES), env=worker_env(ref / "out"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = load_weights(ref / "out", STEPS)

    run_dir, out, lost = tmp_path / "runs", tmp_path / "out", NODES - 1
    logs = [tmp_path / f"node{rank}.log" for rank in range(NODES)]
    nodes = [start_node(four_hosts, rank, run_dir, out, logs[rank]) for rank in range(NODES)]
    try:
        wait_until(lambda: any(s >= 2 * EVERY for s in committed_steps(run_dir)), 600,
                   f"a checkpoint at step >= {2 * EVERY} at W={NODES * PER_NODE}", nodes[0])
        (tmp_path / "slow").touch()  # hold the job back until the lost node has joined again
        killed = kill_namespace(four_hosts[lost][0])
        assert len(killed) >= 1 + PER_NODE, killed  # the node's agent and its workers
        nodes[lost].wait(timeout=60)
        at_loss, saved = steps_logged(run_dir), committed_steps(run_dir)
        wait_until(lambda: training_at(run_dir, (NODES - 1) * PER_NODE), 600,
                   f"the {NODES - 1} remaining nodes training at W={(NODES - 1) * PER_NODE}", nodes[0])
        nodes[lost] = start_node(four_hosts, lost, run_dir, out, logs[lost])
        wait_until(lambda: attempts(run_dir)[-1]["world_size"] == NODES * PER_NODE, 600,
                   f"the job to grow back to W={NODES * PER_NODE}", nodes[0])
        (tmp_path / "slow").unlink()
        for node in nodes:
            node.wait(timeout=900)
    except (AssertionError, subprocess.TimeoutExpired) as err:
        raise AssertionError(f"{err}\n{tails(logs)}") from None
    finally:
        for ns, _, _ in four_hosts:
            kill_namespace(ns)
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=30)
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank} exit {node.returncode}\n{tails(logs)}"
    assert processes_mentioning(str(run_dir)) == []

    runs = attempts(run_dir)
    worlds = [a["world_size"] for a in runs]
    print(f"attempts (start step, world size): {[(a['start_step'], a['world_size']) for a in runs]}; "
          f"node lost after step {at_loss}, checkpoints then {saved}")
    assert worlds[0] == NODES * PER_NODE and worlds[-1] == NODES * PER_NODE, runs
    shrunk = [a for a in runs if a["world_size"] == (NODES - 1) * PER_NODE]
    assert shrunk, runs
    # The survivors went on from the last checkpoint committed before the loss, not from the start.
    assert shrunk[0]["start_step"] == max(saved) and max(saved) >= 2 * EVERY, (runs, saved)
    assert runs[-1]["start_step"] >= shrunk[0]["start_step"], runs

    diff = max_rel_diff(reference, load_weights(out, STEPS))
    print(f"W=16 -> 12 -> 16 vs an uninterrupted W=2 run: max relative difference {diff:.3e}")
    assert diff <= 1e-5
