"""A plain single process, which no launcher started: rank 0 of 1, no process group needed."""

from __future__ import annotations

from typing import Mapping

from distrain.env.base import ProcessInfo


def single_process(environ: Mapping[str, str]) -> ProcessInfo:
    """Rank 0 of 1; MASTER_PORT if set (the process group it may still create listens there)."""
    return ProcessInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                       master_port=int(environ.get("MASTER_PORT", 29500)), source="single")
