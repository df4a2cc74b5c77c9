"""Where pruning reads a weight's values and writes its mask, whatever engine holds it.

- torch tensors and DTensor shards (single, ddp, zero1, accelerate, fsdp): the parameter, or this rank's shard;
- DeepSpeed ZeRO-3: the parameter is empty outside a gather; this rank's partition is ``ds_tensor`` (flat, the last
  rank's padded), and the optimizer steps a separate fp32 copy of it. Both are masked, the padding never counted;
- DeepSpeed stages 0-2: the parameter is whole on every rank, but stages 1-2 (and bf16) step an fp32 master copy
  the engine keeps: it is masked too, through DeepSpeed's own accessors.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn


class ParamView:
    """One selected weight as pruning sees it: its full size, the values this rank counts, and the mask's write."""

    sharded = False  # whether other ranks hold other parts of it (counts are summed over ranks)

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.numel = param.numel()
        self.sharded = hasattr(param, "to_local")

    def local(self) -> torch.Tensor:
        return self.param.to_local() if self.sharded else self.param  # FSDP2's DTensor: this rank's shard

    @torch.no_grad()
    def multiply(self, mask: torch.Tensor) -> None:
        self.local().mul_(mask)


class ZeRO3View(ParamView):
    """A DeepSpeed ZeRO-3 partition: ``ds_tensor`` and the optimizer's fp32 copy, without the padding."""

    sharded = True

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.numel = int(param.ds_numel)
        part = param.ds_tensor.numel()
        rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
        self.valid = max(0, min(part, self.numel - rank * part))

    def local(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: optional: deepspeed only under its engine

        return safe_get_local_fp32_param(self.param).reshape(-1)[: self.valid]

    @torch.no_grad()
    def multiply(self, mask: torch.Tensor) -> None:
        # lazy: optional: deepspeed only under its engine
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(self.param).reshape(-1).clone()
        master[: self.valid].mul_(mask)
        safe_set_local_fp32_param(self.param, master)
        self.param.ds_tensor.reshape(-1)[: self.valid].mul_(mask)


class MasterCopyView(ParamView):
    """A whole parameter whose engine (DeepSpeed stages 0-2) may step an fp32 master copy of it."""

    @torch.no_grad()
    def multiply(self, mask: torch.Tensor) -> None:
        # lazy: optional: deepspeed only under its engine
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        self.param.mul_(mask)
        master = safe_get_full_fp32_param(self.param)  # collective at stages 1-2; None where there is no copy
        if master is not None:
            safe_set_full_fp32_param(self.param, master * mask)


def param_views(params: Sequence[nn.Parameter], deepspeed: bool) -> List[ParamView]:
    """The view of each selected parameter, for the engine that holds it (``deepspeed``: a DeepSpeed engine)."""
    if not deepspeed:
        return [ParamView(p) for p in params]
    return [ZeRO3View(p) if hasattr(p, "ds_tensor") else MasterCopyView(p) for p in params]
