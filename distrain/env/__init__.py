"""Who am I? Rank, local rank, world size and master, from torchrun, SLURM, a Kubeflow pod or a plain process."""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Type

from distrain.env.base import ClusterEnvironment, ProcessInfo
from distrain.env.kubeflow import KubeflowEnvironment
from distrain.env.single import single_process
from distrain.env.slurm import SlurmEnvironment
from distrain.env.torchelastic import TorchElasticEnvironment
from distrain.errors import ConfigError
from distrain.registry import Registry

USER_ENVIRONMENTS = "DISTRAIN_ENVIRONMENTS"  # your own ClusterEnvironment subclasses, as package.module:Class

# Order matters: torchrun started by srun (one per node) sets both, and torchrun's variables are the truth. A
# PyTorchJob pod sets RANK and WORLD_SIZE without LOCAL_RANK, so Kubeflow answers before torchrun (and steps aside
# when torchrun runs inside the pod). A process none of them started is a single process.
ENVIRONMENTS = Registry("environment", USER_ENVIRONMENTS, "ClusterEnvironment subclass",
                        check=lambda cls: isinstance(cls, type) and issubclass(cls, ClusterEnvironment), entries={
                            "kubeflow": KubeflowEnvironment, "torchelastic": TorchElasticEnvironment,
                            "slurm": SlurmEnvironment})


def environments(environ: Mapping[str, str]) -> List[Type[ClusterEnvironment]]:
    """The environments to ask, in order: a user's own (``DISTRAIN_ENVIRONMENTS``, comma-separated import paths, an
    environment variable because a process learns its rank before it loads a config), then the built-ins."""
    own = [ENVIRONMENTS.resolve(path.strip()) for path in environ.get(USER_ENVIRONMENTS, "").split(",") if path.strip()]
    return own + list(ENVIRONMENTS.values())


def detect(environ: Optional[Mapping[str, str]] = None) -> ProcessInfo:
    """Read this process's place in the job from the first environment that recognises itself."""
    environ = os.environ if environ is None else environ
    for env in environments(environ):
        if env.detect(environ):
            info = env.info(environ)
            _check(info)
            return info
    return single_process(environ)


def preempted_exit_code(info: ProcessInfo) -> int:
    """What this process exits with once its preemption checkpoint is committed: its environment's code."""
    return next((env.preempted_exit_code for env in environments(os.environ) if env.name == info.source), 0)


def _check(info: ProcessInfo) -> None:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        names = {"slurm": "SLURM_PROCID/SLURM_NTASKS",
                 "kubeflow": "RANK/WORLD_SIZE or PET_NODE_RANK/PET_NNODES"}.get(info.source, "RANK/WORLD_SIZE")
        raise ConfigError(f"The {info.source} environment says rank {info.rank} of world size {info.world_size} "
                          f"({names}), which is impossible: the rank must be in [0, world_size). Check the "
                          f"launcher's variables.",
                          key="RANK")


__all__ = ["ClusterEnvironment", "ProcessInfo", "detect", "ENVIRONMENTS", "environments", "preempted_exit_code"]
