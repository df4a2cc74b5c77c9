"""Kubernetes pods, simulated for real: each pod is a process in its own network namespace (joined by a veth pair),
with its own host name and /etc/hosts (the job's service names, as cluster DNS gives them), the ConfigMap and the
claim mounted where the rendered manifest mounts them, the command the manifest gives, and exactly the environment
the operator sets (training-operator v1.9 / Kubeflow Trainer v2.3, reproduced in ``operator_env`` from their
source). They must train to the parameters of a torchrun run of the same config (2 ranks, one machine).

Marked ``multinode`` (run with ``-m multinode``; needs root, iproute2 and util-linux's unshare). Namespace names
start with ``dk8s`` so other multi-node tests can run at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from netns import veth_pair
from fault_helpers import (FAST, PYTHON, QUICKSTART, STEPS, load_weights, max_rel_diff, processes_mentioning,
                           reference_weights, steps_logged, wait_until, worker_env)

pytestmark = pytest.mark.multinode

SUBNET = "10.232.0"  # exists only inside this test's namespaces
RENDER = ["--gpus-per-node", "1", "--image", "distrain:test", "--pvc", "runs"]
CONFIG = [*FAST, "checkpoint.every=5"]  # the config travels in the ConfigMap, overrides included

# Each pod runs this in a private mount and UTS namespace: the volumes at the manifest's mount paths, the job's
# names in /etc/hosts, the pod's host name; then the container's command, as its PID 1.
POD_SETUP = """set -e
mount -t tmpfs pod-mnt /mnt
mkdir -p /mnt/config /mnt/distrain
mount --bind "$1" /mnt/config
mount --bind "$2" /mnt/distrain
mount --bind "$3" /etc/hosts
hostname "$4"
shift 4
exec "$@"
"""


@pytest.fixture
def two_pods():
    """[(namespace, address)] for two namespaces joined by a veth pair; removed afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed (apt-get install util-linux)")
    with veth_pair(f"dk8s{os.getpid() % 100000}", SUBNET) as hosts:
        yield [(ns, addr) for ns, _, addr in hosts]


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory) -> dict:
    return reference_weights(tmp_path_factory.mktemp("torchrun"), ["checkpoint.every=5"])


def rendered(tmp_path: Path, *flags: str) -> tuple:
    """(ConfigMap, job) from `distrain k8s render`."""
    proc = subprocess.run([PYTHON, "-m", "distrain", "k8s", "render", QUICKSTART, *RENDER, *flags, *CONFIG],
                          capture_output=True, text=True, timeout=60, env=worker_env(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    configmap, job = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return configmap, job


# --- what the operators put in each pod --------------------------------------------------------------------------
def operator_env(job: dict, role: str, index: int) -> Dict[str, str]:
    """The variables the operator adds to the container of pod ``index`` of ``role`` (Master / Worker / node)."""
    name, spec = job["metadata"]["name"], job["spec"]
    if job["kind"] == "TrainJob":  # Kubeflow Trainer v2.3, pkg/runtime/framework/plugins/torch/torch.go
        trainer = spec["trainer"]
        return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": str(index),  # from the pod's Job completion index annotation
                "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500",
                "JOB_COMPLETION_INDEX": str(index)}  # Kubernetes, for an Indexed Job
    # training-operator v1.9, pkg/controller.v1/pytorch/{envvar,master,elastic}.go
    replicas = spec["pytorchReplicaSpecs"]
    env = {"PYTHONUNBUFFERED": "1"}
    port = replicas[role]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    total = sum(r["replicas"] for r in replicas.values())
    nproc = int(spec["nprocPerNode"]) if spec.get("nprocPerNode", "").isdigit() else 1
    if "Master" in replicas:
        rank = index + (1 if role == "Worker" else 0)
        env.update(MASTER_PORT=str(port), PET_MASTER_PORT=str(port), MASTER_ADDR=f"{name}-master-0",
                   PET_MASTER_ADDR=f"{name}-master-0", WORLD_SIZE=str(total * nproc), RANK=str(rank),
                   PET_NODE_RANK=str(rank))
    if "nprocPerNode" in spec:
        env["PET_NPROC_PER_NODE"] = spec["nprocPerNode"]
    policy = spec.get("elasticPolicy")
    if policy:
        env.update(PET_RDZV_ENDPOINT=f"{name}-worker-0:{port}", PET_RDZV_BACKEND=policy.get("rdzvBackend", "c10d"),
                   PET_NNODES=f"{policy['minReplicas']}:{policy['maxReplicas']}",
                   PET_MAX_RESTARTS=str(policy["maxRestarts"]))
    else:
        env["PET_NNODES"] = str(total)
    return env


def pods_of(job: dict) -> List[tuple]:
    """[(role, index, pod host name, fully qualified names, container)] in the order the operator names them."""
    name = job["metadata"]["name"]
    if job["kind"] == "TrainJob":
        container = {"command": job["spec"]["trainer"]["command"], "env": job["spec"]["trainer"].get("env", [])}
        return [("node", i, f"{name}-node-0-{i}", [f"{name}-node-0-{i}.{name}"], container)
                for i in range(job["spec"]["trainer"]["numNodes"])]
    out = []
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        for i in range(replica["replicas"]):
            out.append((role, i, f"{name}-{role.lower()}-{i}", [],
                        replica["template"]["spec"]["containers"][0]))
    return out


class Pods:
    """The job's pods, started in the namespaces: the manifest's command and volumes, the operator's variables."""

    def __init__(self, tmp_path: Path, namespaces: list, configmap: dict, job: dict):
        self.tmp, self.namespaces, self.job = tmp_path, namespaces, job
        self.config_dir, self.claim = tmp_path / "configmap", tmp_path / "claim"
        self.config_dir.mkdir(exist_ok=True)
        self.claim.mkdir(exist_ok=True)
        for key, text in configmap["data"].items():
            (self.config_dir / key).write_text(text)
        self.pods = pods_of(job)
        assert len(self.pods) == len(namespaces)
        hosts = ["127.0.0.1 localhost"] + [f"{addr} {' '.join(fqdns)} {host}".replace("  ", " ")
                                            for (_, addr), (_, _, host, fqdns, _) in zip(namespaces, self.pods)]
        self.hosts = tmp_path / "hosts"
        self.hosts.write_text("\n".join(hosts) + "\n")
        self.procs: List[subprocess.Popen] = []

    def start(self) -> None:
        self.procs = []
        for (ns, _), (role, index, host, _, container) in zip(self.namespaces, self.pods):
            env = worker_env(self.tmp / "out")  # PATH, PYTHONPATH (the image's distrain + tests' FaultDDP)
            env.update({"HOSTNAME": host, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
            env.update({e["name"]: e["value"] for e in container.get("env", [])})
            env.update(operator_env(self.job, role, index))
            env.update(getattr(self, "extra_env", {}))
            command = container["command"]
            assert command[0] == "distrain"  # the image's entry point
            argv = ["ip", "netns", "exec", ns, "unshare", "--mount", "--uts", "--propagation", "private",
                    "sh", "-c", POD_SETUP, "pod", str(self.config_dir), str(self.claim), str(self.hosts), host,
                    PYTHON, "-m", "distrain", *command[1:]]
            self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True))

    def wait(self, timeout: float = 300) -> List[tuple]:
        try:
            return [(p.wait(timeout=timeout), p.stdout.read()) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()


def check_equal(tmp_path: Path, torchrun_weights: dict, what: str) -> float:
    diff = max_rel_diff(torchrun_weights, load_weights(tmp_path / "out", STEPS))
    print(f"{what} vs torchrun (2 ranks on one machine): max relative difference {diff:.3e}")
    assert diff <= 1e-5
    return diff


def test_pytorchjob_two_pods_one_process_each_and_a_preempted_pod(two_pods, torchrun_weights, tmp_path):
    configmap, job = rendered(tmp_path, "--nodes", "2")
    pods = Pods(tmp_path, two_pods, configmap, job)
    assert [p[2] for p in pods.pods] == ["quickstart-master-0", "quickstart-worker-0"]
    run_dir = pods.claim / "runs"
    # First attempt: the worker pod is evicted mid-run (Kubernetes sends its PID 1 SIGTERM).
    pods.extra_env = {"DISTRAIN_TEST_STEP_DELAY": "0.3"}
    pods.start()
    wait_until(lambda: steps_logged(run_dir) >= 6, 240, "step 6 in metrics.jsonl", pods.procs[0])
    pods.procs[1].send_signal(signal.SIGTERM)
    results = pods.wait()
    for code, output in results:
        # Both ranks stop after the same step and commit a checkpoint; 143, not 0, so the job is not "Succeeded".
        assert code == 143, output[-3000:]
    logs = run_dir / "quickstart" / "logs"
    assert "rank 0/2 (kubeflow)" in (logs / "rank0.log").read_text()  # the operator's variables, read directly
    state = json.loads(sorted((run_dir / "quickstart" / "checkpoints").glob("step_*"))[-1]
                       .joinpath("trainer_state.json").read_text())
    assert 6 <= state["step"] < STEPS and state["reason"] == "preempted"
    # The operator restarts the pods (restartPolicy ExitCode): same command, same variables; they resume.
    pods.extra_env = {}
    pods.start()
    for code, output in pods.wait():
        assert code == 0, output[-3000:]
    for rank in (0, 1):
        log = (logs / f"rank{rank}.log").read_text()
        assert f"resume: loaded /mnt/distrain/runs/quickstart/checkpoints/step_{state['step']:08d}" in log
    assert processes_mentioning(str(pods.claim)) == []
    check_equal(tmp_path, torchrun_weights, f"PyTorchJob 2 pods x 1 process, preempted at step {state['step']}")


@pytest.mark.parametrize("flags, what", [
    (["--nodes", "1:2"], "elastic PyTorchJob (1:2 pods, PET_* -> distrain launch)"),
    (["--kind", "trainjob", "--nodes", "2"], "TrainJob (2 nodes, PET_* -> distrain launch)"),
], ids=["elastic-pytorchjob", "trainjob"])
def test_pet_pods_run_torchrun_inside_each_pod(two_pods, torchrun_weights, tmp_path, flags, what):
    configmap, job = rendered(tmp_path, *flags)
    pods = Pods(tmp_path, two_pods, configmap, job)
    pods.start()
    results = pods.wait()
    for code, output in results:
        assert code == 0, output[-3000:]
    log = (pods.claim / "runs" / "quickstart" / "logs" / "rank0.log").read_text()
    assert "rank 0/2 (torchelastic)" in log  # torchrun's agent, started by `distrain launch`, ran the workers
    check_equal(tmp_path, torchrun_weights, what)
