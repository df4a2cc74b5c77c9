"""The data position is a function of the global step, never of a per-rank iterator.

Step s consumes positions [s*G, (s+1)*G) of an endless stream made of seeded per-epoch permutations of the
dataset. Rank r of W takes the contiguous slice [r*G/W, (r+1)*G/W) of that step's G indices, split into
micro-batches. So the samples a step sees do not depend on the world size, and a resume at any world size
continues on exactly the next sample.
"""

from __future__ import annotations

from typing import Dict, List

import torch


class GlobalStepSampler:
    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        # The newest epochs' permutations (a step spans at most two). Per instance: a functools.lru_cache on the
        # method would be one cache for the class, keyed by (self, epoch), keeping every sampler alive.
        self._orders: Dict[int, torch.Tensor] = {}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.num_samples, generator=gen)
            else:
                order = torch.arange(self.num_samples)
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))  # the oldest first
            self._orders[epoch] = order
        return order

    def epoch_and_offset(self, step: int) -> tuple:
        """Where step ``step`` starts in the stream: (epoch, offset within that epoch)."""
        return divmod(step * self.global_batch, self.num_samples)

    def step_indices(self, step: int) -> List[int]:
        """The G dataset indices of global step ``step``, identical at every world size."""
        start = step * self.global_batch
        out: List[int] = []
        pos = start
        while pos < start + self.global_batch:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.num_samples - offset, start + self.global_batch - pos)
            out.extend(self._epoch_order(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def rank_indices(self, step: int, rank: int, world_size: int) -> List[int]:
        """Rank ``rank``'s contiguous G/W slice of step ``step``."""
        per_rank = self.global_batch // world_size
        return self.step_indices(step)[rank * per_rank:(rank + 1) * per_rank]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> List[List[int]]:
        """This rank's slice of step ``step`` cut into micro-batches of ``micro_batch`` indices."""
        mine = self.rank_indices(step, rank, world_size)
        return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
