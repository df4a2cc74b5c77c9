"""Kubernetes manifests for one config: a Kubeflow PyTorchJob (with or without elasticPolicy) or a TrainJob.

``render`` loads a template from ``launch/k8s/`` (a ConfigMap and the job, readable and editable YAML), checks the
config against every world size the job can have, and fills in what depends on this job: names, replicas (or
numNodes), processes per pod, image, command, GPUs, the grace period, the claim for the run directory and the
resolved config itself. Everything else in the template (node selectors, tolerations, extra volumes) is kept.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from distrain.config import to_yaml
from distrain.errors import UsageError
from distrain.launch.rendezvous import node_range

TEMPLATES = Path(__file__).resolve().parents[2] / "launch" / "k8s"
KINDS = ("pytorchjob", "trainjob")
RUNS_MOUNT = "/mnt/distrain"  # the claim: run directories (checkpoints, metrics, logs) of every attempt
CONFIG_MOUNT = "/mnt/config"  # the ConfigMap holding the resolved config
CONFIG_PATH = f"{CONFIG_MOUNT}/config.yaml"
MANAGED_VOLUMES = ("config", "runs")  # the template's volumes (and mounts) this module fills in
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class JobSpec:
    """What `distrain k8s render` was asked for."""

    kind: str  # pytorchjob | trainjob
    nodes: str  # "N" or "MIN:MAX"
    gpus_per_node: int  # 0: CPU pods with one process each
    image: str
    pvc: Optional[str] = None  # the ReadWriteMany claim for run.dir; None: an emptyDir (one pod only)
    elastic: bool = False  # PyTorchJob with elasticPolicy (implied by nodes MIN:MAX)
    name: Optional[str] = None  # the job's name; default: run.name
    namespace: Optional[str] = None
    grace_period_s: Optional[int] = None  # default: long enough for the last step and the preemption checkpoint
    max_restarts: int = 3  # elastic: worker-group restarts inside each pod's agent
    template: Optional[Path] = None

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    def node_range(self) -> Tuple[int, int]:
        return node_range(self.nodes, "--nodes")


def grace_period(cfg: DictConfig) -> int:
    """Seconds Kubernetes waits between SIGTERM and SIGKILL: the step in flight and the checkpoint's collectives
    each end within dist.timeout_s (or fail), plus a minute to write and commit."""
    return int(2 * cfg.dist.timeout_s + 60)


def render(cfg: DictConfig, job: JobSpec) -> Tuple[str, List[str]]:
    """(the manifests as one multi-document YAML, warnings for the user) for the resolved config ``cfg``."""
    from distrain.preflight import check_job  # lazy: start-up: pulls in torch, which this module does without

    least, most = job.node_range()
    elastic = job.elastic or least != most
    if job.kind not in KINDS:
        raise UsageError(f"--kind {job.kind!r} is not one of {', '.join(KINDS)}.")
    if job.kind == "trainjob" and elastic:
        raise UsageError("A TrainJob has a fixed number of nodes (Kubeflow Trainer's torch runtime has no elastic "
                         "mode yet): use --nodes N, or --kind pytorchjob for an elastic job.")
    if job.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node {job.gpus_per_node} is not allowed: it must be 0 (CPU pods) or more.")
    name = job.name or re.sub(r"[^a-z0-9-]+", "-", str(cfg.run.name).lower()).strip("-")
    if not _DNS1035.match(name) or len(name) > 40:
        raise UsageError(f"Job name {name!r} is not usable on Kubernetes: it must start with a letter, hold only "
                         f"lower-case letters, digits and '-', and have at most 40 characters (pod names add "
                         f"suffixes to it). Pass --name.")
    if most > 1 and not job.pvc:
        raise UsageError(f"--nodes {job.nodes} needs --pvc CLAIM: every pod writes its shard of each checkpoint "
                         f"into one shared run directory, so it must be a ReadWriteMany PersistentVolumeClaim "
                         f"mounted in every pod.")
    # an elastic job may run at any of these sizes: the batch must divide at each
    check_job(cfg, [nodes * job.procs_per_node for nodes in range(least, most + 1)])

    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "run.dir", f"{RUNS_MOUNT}/runs")  # on the claim: a restarted pod finds its checkpoints
    warnings = []
    if not job.pvc:
        warnings.append("no --pvc: the run directory is an emptyDir, which survives a container restart but not "
                        "the pod being deleted or rescheduled; pass --pvc CLAIM to keep checkpoints across those.")
    grace = job.grace_period_s if job.grace_period_s is not None else grace_period(cfg)

    template = job.template or TEMPLATES / {"trainjob": "trainjob.yaml"}.get(
        job.kind, "pytorchjob-elastic.yaml" if elastic else "pytorchjob.yaml")
    try:
        documents = [d for d in yaml.safe_load_all(Path(template).read_text()) if d]
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--template {template}: cannot read it as YAML ({err}).") from None
    fill = _Filler(job, name, grace, elastic, least, most)
    for doc in documents:
        kind = doc.get("kind")
        doc.setdefault("metadata", {})
        if job.namespace:
            doc["metadata"]["namespace"] = job.namespace
        if kind == "ConfigMap":
            doc["metadata"]["name"] = f"{name}-config"
            doc["data"] = {"config.yaml": to_yaml(cfg)}
        elif kind == "PyTorchJob":
            fill.pytorchjob(doc)
        elif kind == "TrainJob":
            fill.trainjob(doc)
    header = (f"# Rendered by `distrain k8s render` for {most if least == most else f'{least} to {most}'} pod(s) x "
              f"{job.procs_per_node} process(es): kubectl apply -f <this file>\n")
    return header + yaml.safe_dump_all(documents, sort_keys=False, width=120), warnings


class _Filler:
    """Writes this job's values into a template's documents."""

    def __init__(self, job: JobSpec, name: str, grace: int, elastic: bool, least: int, most: int):
        self.job, self.name, self.grace, self.elastic, self.least, self.most = job, name, grace, elastic, least, most

    def command(self, direct: bool) -> List[str]:
        # One process per pod of a PyTorchJob with a Master reads the operator's RANK/WORLD_SIZE itself; anything
        # else (several processes per pod, an elastic rendezvous, a TrainJob) starts torchrun's agent, which reads
        # the PET_* variables.
        return ["distrain", "train" if direct else "launch", CONFIG_PATH]

    def pytorchjob(self, doc: Dict[str, Any]) -> None:
        doc["metadata"]["name"] = self.name
        spec = doc["spec"]
        spec["nprocPerNode"] = str(self.job.procs_per_node)
        replicas = spec["pytorchReplicaSpecs"]
        if self.elastic:
            policy = spec.setdefault("elasticPolicy", {})
            policy.update(rdzvBackend=policy.get("rdzvBackend", "c10d"), minReplicas=self.least,
                          maxReplicas=self.most, maxRestarts=self.job.max_restarts)
            replicas.pop("Master", None)
            replicas["Worker"]["replicas"] = self.most
        else:
            spec.pop("elasticPolicy", None)
            replicas["Master"]["replicas"] = 1
            if self.most > 1:
                replicas["Worker"]["replicas"] = self.most - 1
            else:
                replicas.pop("Worker", None)
        direct = not self.elastic and self.job.procs_per_node == 1
        for replica in replicas.values():
            pod = replica["template"].setdefault("spec", {})
            container = _container(pod, "pytorch")
            container["image"] = self.job.image
            container["command"] = self.command(direct)
            container.pop("args", None)
            self._resources(container)
            self.pod(pod, container)

    def trainjob(self, doc: Dict[str, Any]) -> None:
        doc["metadata"]["name"] = self.name
        trainer = doc["spec"].setdefault("trainer", {})
        trainer.update(image=self.job.image, command=self.command(direct=False), numNodes=self.most,
                       numProcPerNode=self.job.procs_per_node)
        trainer.pop("args", None)
        if self.job.gpus_per_node:
            trainer.setdefault("resourcesPerNode", {}).setdefault("limits", {})["nvidia.com/gpu"] = \
                str(self.job.gpus_per_node)  # a Kubernetes quantity: the SDKs' models read it as a string
        elif "resourcesPerNode" in trainer:
            trainer["resourcesPerNode"].get("limits", {}).pop("nvidia.com/gpu", None)
        for patch in doc["spec"].get("runtimePatches", []):
            template = patch.get("trainingRuntimeSpec", {}).get("template", {})
            for replicated in template.get("spec", {}).get("replicatedJobs", []):
                pod = replicated["template"]["spec"]["template"]["spec"]
                self.pod(pod, _container(pod, "node"))

    def _resources(self, container: Dict[str, Any]) -> None:
        limits = container.setdefault("resources", {}).setdefault("limits", {})
        if self.job.gpus_per_node:
            limits["nvidia.com/gpu"] = str(self.job.gpus_per_node)  # a quantity, as kubectl writes it
        else:
            limits.pop("nvidia.com/gpu", None)
        if not limits:
            container["resources"].pop("limits")
        if not container["resources"]:
            container.pop("resources")

    def pod(self, pod: Dict[str, Any], container: Dict[str, Any]) -> None:
        """Grace period, the config and run-directory volumes and their mounts (other volumes are kept)."""
        pod["terminationGracePeriodSeconds"] = self.grace
        runs = ({"persistentVolumeClaim": {"claimName": self.job.pvc}} if self.job.pvc else {"emptyDir": {}})
        volumes = [v for v in pod.get("volumes", []) if v.get("name") not in MANAGED_VOLUMES]
        pod["volumes"] = [{"name": "config", "configMap": {"name": f"{self.name}-config"}},
                          {"name": "runs", **runs}] + volumes
        mounts = [m for m in container.get("volumeMounts", []) if m.get("name") not in MANAGED_VOLUMES]
        container["volumeMounts"] = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                                     {"name": "runs", "mountPath": RUNS_MOUNT}] + mounts


def check_with_sdk(text: str) -> None:
    """Read each rendered job with the operator's own Python SDK model and require it to write back exactly the
    same document: a field the operator does not know, or a value of the wrong type, would be dropped or changed.
    Needs the Kubeflow SDKs (``pip install 'distrain[k8s]'``)."""
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") not in ("PyTorchJob", "TrainJob"):
            continue
        try:
            if doc["kind"] == "PyTorchJob":
                from kubeflow.training import ApiClient  # lazy: optional: the Kubeflow SDK is optional (distrain[k8s])

                client = ApiClient()
                back = client.sanitize_for_serialization(
                    client.deserialize(SimpleNamespace(data=json.dumps(doc)), "KubeflowOrgV1PyTorchJob"))
            else:
                # lazy: optional: the Kubeflow SDK is optional (distrain[k8s])
                from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

                back = TrainerV1alpha1TrainJob.from_dict(doc).to_dict()
        except ImportError:
            raise UsageError("--check reads the manifests with the Kubeflow SDKs, which are not installed: "
                             "pip install 'distrain[k8s]' (kubeflow-training for PyTorchJob, kubeflow-trainer-api "
                             "for TrainJob).") from None
        if back != doc:
            raise UsageError(f"The {doc['kind']} does not survive the Kubeflow SDK's model: it reads back "
                             f"differently at {', '.join(_differences(doc, back)[:5])}. Check the template "
                             f"(--template) for misspelled fields or values of the wrong type.")


def _differences(a: Any, b: Any, path: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (_differences(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def _container(pod: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The pod's container called ``name`` (the one the operator expects), added when the template lacks it."""
    containers = pod.setdefault("containers", [])
    for container in containers:
        if container.get("name") == name:
            return container
    containers.insert(0, {"name": name})
    return containers[0]
