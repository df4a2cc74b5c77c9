"""A plain single process: rank 0 of 1, no process group needed."""

from __future__ import annotations

from typing import Mapping

from distrain.env.base import ClusterEnvironment, ProcessInfo


class SingleProcessEnvironment(ClusterEnvironment):
    name = "single"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return True

    @staticmethod
    def info(environ: Mapping[str, str]) -> ProcessInfo:
        return ProcessInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                           master_port=int(environ.get("MASTER_PORT", 29500)), source=SingleProcessEnvironment.name)
