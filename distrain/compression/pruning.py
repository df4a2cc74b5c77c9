"""Magnitude pruning on a schedule, identical on every rank and at every world size.

The masks come from the synchronised weights: at each mask update the k smallest magnitudes go, k = amount x the
number of selected weights (``global``: one threshold over all of them; ``layer``: each tensor its own). The k-th
smallest magnitude is found by an interval search over the float32 bit patterns (non-negative floats order like
their bits), 64 candidate thresholds per round, each rank counting only the magnitudes it holds and the counts
summed with one all-reduce: a sharded model (FSDP2) is never gathered, and since the counts are integers the
threshold is the same bit pattern at any world size. Replicated weights (ddp, zero1) are counted locally.

A pruned weight is exactly zero and is put back to zero after every optimizer step, so the mask is the zero
pattern of the weights: a checkpoint holds it in the weights themselves (resharded by DCP at any world size), and
a resume rebuilds it from them and checks it against the zero counts recorded at the save.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from distrain import dist
from distrain.strategies.param_views import ParamView

FLOAT_INF_BITS = 0x7F800000  # +inf as int32: every finite magnitude's bit pattern lies in [0, this]
CANDIDATES = 64  # thresholds tried per round: 31 bits in 6 rounds of one all-reduce each


def ramp(step: int, amount: float, start: int, end: int) -> float:
    """The sparsity due after ``step`` steps: 0 before ``start``, then Zhu & Gupta's cubic ramp up to ``amount`` at
    ``end`` (fast early, gentle near the end, when fewer weights are left to take)."""
    if step < start:
        return 0.0
    if step >= end:
        return amount
    return amount * (1.0 - (1.0 - (step - start) / (end - start)) ** 3)


def is_update_step(step: int, start: int, end: int, every: int) -> bool:
    """Whether the masks are recomputed after ``step`` steps: every ``every`` steps from start, and at end."""
    return start <= step <= end and ((step - start) % every == 0 or step == end)


def kth_magnitude(tensors: Sequence[torch.Tensor], k: int, sharded: bool) -> int:
    """The bit pattern of the k-th smallest |value| (1-based) over ``tensors`` (this rank's parts when
    ``sharded``: the counts are summed over ranks), found with a 64-way interval search."""
    bits = torch.cat([t.detach().abs().float().flatten().view(torch.int32).to(torch.int64) for t in tensors]).sort()
    sorted_bits = bits.values
    lo, hi = 0, FLOAT_INF_BITS
    while lo < hi:
        width = hi - lo
        cuts = sorted({lo + width * i // CANDIDATES for i in range(1, CANDIDATES)} | {hi})
        counts = torch.searchsorted(sorted_bits, torch.tensor(cuts, dtype=torch.int64), right=True)
        if sharded:
            counts = dist.all_reduce_sum(counts)
        first = int(torch.nonzero(counts >= k)[0])  # hi is always enough: every magnitude is <= +inf
        lo, hi = (cuts[first - 1] + 1 if first else lo), cuts[first]
    return lo


def _threshold_masks(tensors: Sequence[torch.Tensor], bits: int) -> List[torch.Tensor]:
    """Keep-masks: True where |value| is above the threshold ``bits`` (ties with it are pruned too)."""
    return [t.detach().abs().float().view(torch.int32) > bits for t in tensors]


class Pruner:
    """The masks of the selected weights, recomputed on the schedule and applied after every optimizer step."""

    def __init__(self, names: Sequence[str], views: Sequence[ParamView], scope: str):
        self.names = list(names)
        self.views = list(views)
        self.scope = scope
        self.sharded = any(v.sharded for v in self.views)
        self.masks: Optional[List[torch.Tensor]] = None  # None until the first update: nothing is pruned
        self.amount = 0.0  # the sparsity the masks were last computed for

    def update(self, amount: float) -> None:
        """Recompute the masks so that ``amount`` of the selected weights are zero, and apply them."""
        self.amount = amount
        local = [v.local() for v in self.views]
        if self.scope == "global":
            k = int(amount * sum(v.numel for v in self.views))
            self.masks = _threshold_masks(local, kth_magnitude(local, k, self.sharded)) if k else None
        else:
            self.masks = [_threshold_masks([t], kth_magnitude([t], int(amount * v.numel), self.sharded))[0]
                          if int(amount * v.numel) else torch.ones_like(t, dtype=torch.bool)
                          for t, v in zip(local, self.views)]
        self.apply()

    def apply(self) -> None:
        """Zero the pruned weights again (after an optimizer step moved them)."""
        if self.masks is None:
            return
        for view, mask in zip(self.views, self.masks):
            view.multiply(mask)

    def zero_counts(self) -> Dict[str, int]:
        """Zeros per selected tensor, over all ranks (collective when sharded)."""
        local = torch.tensor([int((v.local() == 0).sum()) for v in self.views], dtype=torch.int64)
        counts = dist.all_reduce_sum(local) if self.sharded else local
        return dict(zip(self.names, counts.tolist()))

    def sizes(self) -> Dict[str, int]:
        """Elements per selected tensor (whole, not this rank's part)."""
        return {name: v.numel for name, v in zip(self.names, self.views)}

    def rebuild(self, amount: float) -> None:
        """After a resume: the masks are the loaded weights' zero pattern (pruned weights were saved as zeros)."""
        self.amount = amount
        self.masks = [v.local().detach() != 0 for v in self.views] if amount > 0 else None
