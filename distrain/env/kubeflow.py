"""Kubeflow on Kubernetes: a PyTorchJob pod, or a pod that only has the PET_* variables torchrun reads.

What the operators put in every container (training-operator ``pkg/controller.v1/pytorch/{envvar,master,elastic}.go``,
Kubeflow Trainer ``pkg/runtime/framework/plugins/torch/torch.go``):

* PyTorchJob (kubeflow.org/v1) with a Master replica: ``MASTER_ADDR=<job>-master-0``, ``MASTER_PORT``,
  ``WORLD_SIZE`` = pods x nprocPerNode, ``RANK`` = the pod's index (master 0, worker i -> i + 1) - and no
  LOCAL_RANK - plus ``PET_NODE_RANK``, ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (when nprocPerNode is set),
  ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``. With one process per pod these are that process's place: local
  rank 0 of 1. More processes per pod need torchrun (``distrain launch``) to start them.
* PyTorchJob with ``elasticPolicy`` (Workers only): ``PET_RDZV_ENDPOINT=<job>-worker-0:<port>``,
  ``PET_RDZV_BACKEND``, ``PET_NNODES`` (MIN:MAX), ``PET_MAX_RESTARTS``, ``PET_NPROC_PER_NODE`` - a rendezvous
  only torchrun's agent can join.
* TrainJob (trainer.kubeflow.org/v1alpha1, torch runtime): ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
  ``PET_NODE_RANK`` (the Job completion index), ``PET_MASTER_ADDR=<job>-node-0-0.<job>``, ``PET_MASTER_PORT``.

When torchrun runs inside the pod its own variables (LOCAL_RANK, TORCHELASTIC_RUN_ID) are the truth and
TorchElasticEnvironment answers; ``torchrun_settings`` is what ``distrain launch`` reads from PET_* in that case.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping, Optional

from distrain.env.base import ClusterEnvironment, ProcessInfo, int_var
from distrain.errors import ConfigError

PET_VARIABLES = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT")
# A pod stopped for preemption exits with 128 + SIGTERM once its checkpoint is committed: not 0, which would
# mark a PyTorchJob's master (and so the job) Succeeded; a restartPolicy of ExitCode retries exit codes >= 128.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def _under_torchrun(environ: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ


class KubeflowEnvironment(ClusterEnvironment):
    name = "kubeflow"
    preempted_exit_code = PREEMPTED_EXIT_CODE

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        if _under_torchrun(environ):
            return False
        pytorchjob = "KUBERNETES_SERVICE_HOST" in environ and "RANK" in environ and "WORLD_SIZE" in environ
        return pytorchjob or any(name in environ for name in PET_VARIABLES)

    @staticmethod
    def info(environ: Mapping[str, str]) -> ProcessInfo:
        procs = environ.get("PET_NPROC_PER_NODE", "1")
        if "RANK" in environ or "WORLD_SIZE" in environ:  # a PyTorchJob pod with a Master replica
            if procs != "1":
                raise _needs_torchrun(f"PET_NPROC_PER_NODE={procs}: the PyTorchJob runs {procs} processes per pod")
            return _one_process_per_pod(environ, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        nodes = environ.get("PET_NNODES", "")
        if ":" in nodes or ("PET_RDZV_ENDPOINT" in environ and "PET_NODE_RANK" not in environ):
            raise _needs_torchrun(f"PET_NNODES={nodes or '?'}, PET_RDZV_ENDPOINT={environ.get('PET_RDZV_ENDPOINT')}: "
                                  f"an elastic job, whose rendezvous only torchrun's agent can join")
        if procs != "1":
            raise _needs_torchrun(f"PET_NPROC_PER_NODE={procs}: the job runs {procs} processes per pod")
        return _one_process_per_pod(environ, "PET_NODE_RANK", "PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def _one_process_per_pod(environ: Mapping[str, str], rank: str, world: str, addr: str, port: str) -> ProcessInfo:
    """The pod's place from the operator's variables of these names: local rank 0 of 1."""
    if addr not in environ:
        raise _half_set(addr)
    src = "Kubeflow"
    return ProcessInfo(rank=int_var(environ, rank, src), local_rank=0, world_size=int_var(environ, world, src),
                       local_world_size=1, master_addr=environ[addr], master_port=int_var(environ, port, src),
                       source=KubeflowEnvironment.name)


def _needs_torchrun(why: str):
    return ConfigError(f"This Kubernetes pod cannot run as one `distrain train` process ({why}). Start the pod's "
                       f"workers with `distrain launch CONFIG`, which reads the PET_* variables the operator set "
                       f"(as torchrun does), or with torchrun itself; `distrain k8s render` writes such a command.",
                       key="PET_NPROC_PER_NODE")


def _half_set(name: str):
    return ConfigError(f"Environment variable {name} is not set, but the other Kubeflow variables are: the pod's "
                       f"environment is half set, so the master is unknown. The operator sets it for a PyTorchJob "
                       f"with a Master replica or a TrainJob; for an elastic job start `distrain launch CONFIG`.",
                       key=name)


@dataclass(frozen=True)
class TorchrunSettings:
    """What the PET_* variables tell torchrun (``distrain launch``) about this pod's part of the job."""

    nnodes: Optional[str] = None  # "N" or "MIN:MAX"
    nproc_per_node: Optional[int] = None
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None  # HOST:PORT
    rdzv_id: Optional[str] = None
    max_restarts: Optional[int] = None


def torchrun_settings(environ: Optional[Mapping[str, str]] = None) -> TorchrunSettings:
    """torchrun's own PET_* defaults, read the way torch.distributed.run reads them (an ``--x-y`` flag's default
    is ``PET_X_Y``); ``PET_NPROC_PER_NODE`` may be auto, gpu or cpu, resolved here as torchrun does."""
    environ = os.environ if environ is None else environ

    def number(name: str) -> Optional[int]:
        value = environ.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"Environment variable {name}={value!r} is not an integer (the Kubeflow operator "
                              f"sets it to one).", key=name) from None

    endpoint = environ.get("PET_RDZV_ENDPOINT") or None
    if endpoint is None and environ.get("PET_MASTER_ADDR"):
        endpoint = f"{environ['PET_MASTER_ADDR']}:{environ.get('PET_MASTER_PORT', '29500')}"
    procs = environ.get("PET_NPROC_PER_NODE")
    return TorchrunSettings(nnodes=environ.get("PET_NNODES") or None,
                            nproc_per_node=_resolve_nproc(procs) if procs else None,
                            node_rank=number("PET_NODE_RANK"), rdzv_endpoint=endpoint,
                            rdzv_id=environ.get("PET_RDZV_ID") or None, max_restarts=number("PET_MAX_RESTARTS"))


def _resolve_nproc(value: str) -> int:
    """auto: one per GPU, else one per CPU; gpu / cpu: one per GPU / CPU (torch.distributed.run's rules)."""
    if value.isdigit():
        return int(value)
    if value in ("auto", "gpu", "cpu"):
        import torch  # lazy: start-up: torch takes seconds to import

        if value != "cpu" and torch.cuda.is_available():
            return torch.cuda.device_count()
        if value == "gpu":
            raise ConfigError("PET_NPROC_PER_NODE=gpu but this pod sees no GPU. Request GPUs for the pod "
                              "(resources.limits nvidia.com/gpu) or use a number.", key="PET_NPROC_PER_NODE")
        return os.cpu_count() or 1
    raise ConfigError(f"PET_NPROC_PER_NODE={value!r} is not a number, auto, gpu or cpu.", key="PET_NPROC_PER_NODE")
