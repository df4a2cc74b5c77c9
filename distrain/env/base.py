"""What every cluster environment answers: who am I, how many are we, who is the master."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Mapping

from distrain.errors import ConfigError


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # which environment answered: kubeflow | torchelastic | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class ClusterEnvironment(abc.ABC):
    """One cluster environment: ``detect`` says whether it applies, ``info`` reads it (both abstract)."""

    name = "base"
    # What the process exits with once a preemption's checkpoint is committed: 0 (the job ends as it should), or a
    # code the platform restarts on (a Kubeflow pod).
    preempted_exit_code = 0

    @staticmethod
    @abc.abstractmethod
    def detect(environ: Mapping[str, str]) -> bool:
        """Whether ``environ`` is this environment's (its launcher's variables are set)."""

    @staticmethod
    @abc.abstractmethod
    def info(environ: Mapping[str, str]) -> ProcessInfo:
        """This process's rank, local rank, world size and master address, read from ``environ``."""


def int_var(environ: Mapping[str, str], name: str, source: str) -> int:
    """Read an integer environment variable, or raise a ConfigError naming it."""
    value = environ.get(name)
    if value is None:
        raise ConfigError(f"Environment variable {name} is not set, but the other {source} variables are: the "
                          f"{source} environment is half set. Launch with {source} itself, or unset its variables "
                          f"to run as a single process.", key=name)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r} is not an integer ({source} sets it to one).",
                          key=name) from None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which SLURM and containers set), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
