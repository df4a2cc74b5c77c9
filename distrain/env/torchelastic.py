"""torchrun / torch.distributed.run / `distrain launch`: the elastic agent sets RANK, WORLD_SIZE and friends."""

from __future__ import annotations

from typing import Mapping

from distrain.env.base import ClusterEnvironment, ProcessInfo, int_var


class TorchElasticEnvironment(ClusterEnvironment):
    name = "torchelastic"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return any(k in environ for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"))

    @staticmethod
    def info(environ: Mapping[str, str]) -> ProcessInfo:
        src = "torchrun"
        world = int_var(environ, "WORLD_SIZE", src)
        return ProcessInfo(
            rank=int_var(environ, "RANK", src),
            local_rank=int_var(environ, "LOCAL_RANK", src),
            world_size=world,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            source=TorchElasticEnvironment.name,
        )
