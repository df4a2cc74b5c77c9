"""SLURM with one srun task per worker: rank, world and local rank from SLURM_*; the master is the first host.

When srun starts one torchrun per node instead, torchrun's variables are set and TorchElasticEnvironment
answers first (see distrain.env.detect).
"""

from __future__ import annotations

from typing import Mapping

from distrain.env.base import ClusterEnvironment, ProcessInfo, int_var
from distrain.env.hostlist import first_host
from distrain.errors import ConfigError


def port_for_job(job_id: str) -> int:
    """A port every task of a job derives alike, spread over 20000-39999 so neighbouring jobs don't collide."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits[-9:]) % 20000


class SlurmEnvironment(ClusterEnvironment):
    name = "slurm"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        # SLURM_STEP_ID marks a process started by srun; a plain `python` in a batch script is a single process.
        return "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and "SLURM_JOB_ID" in environ

    @staticmethod
    def info(environ: Mapping[str, str]) -> ProcessInfo:
        src = "SLURM"
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: the SLURM environment is half set, "
                              "so the master host is unknown. Start the workers with srun inside an allocation.",
                              key="SLURM_JOB_NODELIST")
        world = int_var(environ, "SLURM_NTASKS", src)
        return ProcessInfo(
            rank=int_var(environ, "SLURM_PROCID", src),
            local_rank=int_var(environ, "SLURM_LOCALID", src),
            world_size=world,
            local_world_size=int(environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world,
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(environ.get("MASTER_PORT") or port_for_job(environ["SLURM_JOB_ID"])),
            source=SlurmEnvironment.name,
        )
