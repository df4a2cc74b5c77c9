"""Who am I? Rank, local rank, world size and master, from torchrun, SLURM, a Kubeflow pod or a plain process."""

from __future__ import annotations

import os
from typing import Mapping, Optional

from distrain.env.base import ClusterEnvironment, ProcessInfo
from distrain.env.kubeflow import KubeflowEnvironment
from distrain.env.single import single_process
from distrain.env.slurm import SlurmEnvironment
from distrain.env.torchelastic import TorchElasticEnvironment
from distrain.errors import ConfigError

# Order matters: torchrun started by srun (one per node) sets both, and torchrun's variables are the truth. A
# PyTorchJob pod sets RANK and WORLD_SIZE without LOCAL_RANK, so Kubeflow answers before torchrun (and steps aside
# when torchrun runs inside the pod). A process none of them started is a single process.
ENVIRONMENTS = (KubeflowEnvironment, TorchElasticEnvironment, SlurmEnvironment)


def detect(environ: Optional[Mapping[str, str]] = None) -> ProcessInfo:
    """Read this process's place in the job from the first environment that recognises itself."""
    environ = os.environ if environ is None else environ
    for env in ENVIRONMENTS:
        if env.detect(environ):
            info = env.info(environ)
            _check(info)
            return info
    return single_process(environ)


def preempted_exit_code(info: ProcessInfo) -> int:
    """What this process exits with once its preemption checkpoint is committed: its environment's code."""
    return next((env.preempted_exit_code for env in ENVIRONMENTS if env.name == info.source), 0)


def _check(info: ProcessInfo) -> None:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        names = {"slurm": "SLURM_PROCID/SLURM_NTASKS",
                 "kubeflow": "RANK/WORLD_SIZE or PET_NODE_RANK/PET_NNODES"}.get(info.source, "RANK/WORLD_SIZE")
        raise ConfigError(f"The {info.source} environment says rank {info.rank} of world size {info.world_size} "
                          f"({names}), which is impossible: the rank must be in [0, world_size). Check the "
                          f"launcher's variables.",
                          key="RANK")


__all__ = ["ClusterEnvironment", "ProcessInfo", "detect", "ENVIRONMENTS", "preempted_exit_code"]
