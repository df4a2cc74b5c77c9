"""A micro-batch with no valid items under a per-micro-batch mean loss (0/0), found without a per-step host read.

Where a loss is a mean over its own micro-batch's items (it does not take ``num_items_in_batch``) and the items
are counted on the device (labels that are not -100, or the user's count), a micro-batch whose every label is
padding makes the loss 0/0. Reading the counts on the host every step would synchronise a GPU every step, so each
rank only notes, on the device, the first such step and micro-batch; ``settle`` (a collective, where the loop
synchronises anyway: log steps, before a checkpoint is saved, after the last step; run by the DivergenceGuard
before it acts on the non-finite loss that 0/0 made) raises the ConfigError that names the step, the rank and the
micro-batch, on every rank alike. A checkpoint is never saved past it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from distrain import dist
from distrain.errors import ConfigError


class EmptyItemsCheck:
    """Notes empty micro-batches on the device every step; refuses them at the next ``settle``. ``explain(micro,
    step, rank)`` builds the error paragraph; ``key`` is the config key it names."""

    def __init__(self, explain: Callable[[int, int, int], str], key: str):
        self.explain, self.key = explain, key
        self._noted: Optional[torch.Tensor] = None  # [step, micro-batch] of the first empty one since settle; -1s

    def note(self, counts: Sequence[torch.Tensor], step: int) -> None:
        """Device work only: remember the first micro-batch of ``step`` without items, if this step has one."""
        empty = torch.stack(list(counts)) == 0
        first = empty.to(torch.float64).argmax().to(torch.float64)  # 0 when none is empty: masked out below
        found = torch.stack([torch.full_like(first, float(step)), first])  # a fill, not a host-to-device copy
        here = torch.where(empty.any(), found, torch.full_like(found, -1.0))
        self._noted = here if self._noted is None else torch.where(self._noted[0] >= 0, self._noted, here)

    def settle(self) -> None:
        """Collective (every rank at the same points): raise the ConfigError for the earliest empty micro-batch any
        rank noted since the last settle."""
        if self._noted is None:  # nothing counted on the device since the last settle, alike on every rank
            return
        noted, self._noted = self._noted, None
        per_rank: List[List[float]] = dist.per_rank_vector(noted)
        found = [(int(step), rank, int(micro)) for rank, (step, micro) in enumerate(per_rank) if step >= 0]
        if found:
            step, rank, micro = min(found)
            raise ConfigError(self.explain(micro, step, rank), key=self.key)


__all__ = ["EmptyItemsCheck"]
