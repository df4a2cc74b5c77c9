"""DDP communication hooks by name: compress gradients to fp16/bf16 on the wire, or PowerSGD low-rank."""

from __future__ import annotations

from typing import Optional

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distrain.errors import ConfigError

HOOKS = ("fp16", "bf16", "powersgd")


def register_comm_hook(ddp: DistributedDataParallel, name: Optional[str], powersgd_rank: int = 1) -> None:
    """Attach the named hook (None = DDP's default all-reduce in the gradient dtype)."""
    if name is None:
        return
    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "powersgd":
        # start_powerSGD_iter >= 2 is PowerSGD's own requirement (warm-up with exact all-reduce).
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=1,
                                            use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        raise ConfigError(f"strategy.kwargs.comm_hook={name!r} is not a known DDP comm hook. Allowed: "
                          f"{', '.join(HOOKS)} (or null for plain all-reduce).", key="strategy.kwargs.comm_hook")
