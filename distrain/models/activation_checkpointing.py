"""``train.activation_checkpointing``: recompute a block's activations in backward instead of keeping them.

``full`` checkpoints every block (see distrain.models.blocks), ``every:N`` every N-th one (blocks 0, N, 2N, ...,
torchtitan's selective layer checkpointing), ``none`` nothing. A checkpointed block keeps only its input during
forward and runs its forward again inside backward: peak activation memory drops from one set per block to about
one block's, for roughly one more forward of the checkpointed blocks.

The block's ``forward`` is replaced in place by a ``torch.utils.checkpoint`` call (non-reentrant, random state
preserved so dropout recomputes the same mask), so parameter names, state dicts and checkpoints stay those of
the plain model, unlike ``checkpoint_wrapper``, which adds a ``_checkpoint_wrapped_module.`` level. It is applied
before torch.compile (which traces the checkpoint as one region) and before FSDP (whose pre-backward hook
gathers the block's parameters before the recomputation needs them), the order torchtitan and Accelerate use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch.utils.checkpoint
from torch import nn

from distrain.config.validation import checkpoint_every
from distrain.errors import ConfigError
from distrain.models.blocks import find_blocks


def apply_activation_checkpointing(model: nn.Module, mode: str, blocks: Optional[Sequence[str]]) -> int:
    """Checkpoint ``model``'s blocks as ``mode`` says; returns how many blocks were checkpointed."""
    every = checkpoint_every(mode)
    if not every:
        return 0
    found = find_blocks(model, blocks, key="train.blocks")
    if not found:
        raise ConfigError(f"train.activation_checkpointing={mode} checkpoints a model's blocks, but this "
                          f"{type(model).__name__} has no nn.ModuleList of blocks. Name its block classes in "
                          f"train.blocks (e.g. train.blocks=[MyBlock]), or set train.activation_checkpointing=none.",
                          key="train.activation_checkpointing")
    chosen = found[::every]
    for block in chosen:
        block.forward = _checkpointed(block.forward)
    return len(chosen)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
