"""QAT's gradient sum in float64: one rank and W ranks hand the optimizer bit-identical float32 gradients.

Why (measured, docs/compression.md): one rank adds its micro-batches' float32 gradients in one order, DDP adds each
rank's partial sums in another, and the two differ in the last bit. Where a gradient cancels to nearly nothing (|g| ~
1e-9, under AdamW's eps of 1e-8) that last bit is a 1e-3 relative change of g, which AdamW's normalisation turns into a
weight difference of 1.8e-5 relative in one step (4.4e-5 after six, on the quickstart, with or without QAT); QAT's
rounding to the int8 grid adds to it, as a last bit next to a rounding tie becomes a grid step. A float64 sum of the
step's few float32 terms (micro-batches x ranks) is exact unless their magnitudes lie some 10^7 apart (and then off by
2^-53 of the largest, which moves the float32 result only where it sits that close to a float32 rounding boundary), so
the order no longer matters and the one rounding to float32 is the same at every world size.

Each parameter's post-accumulate-grad hook (torch's) moves its micro-batch gradient into one flat float64 buffer;
``finish``, before the update, all-reduces that buffer once (twice the bytes of DDP's float32 all-reduce, after the
backward instead of overlapped with it) and writes the float32 sums into ``p.grad``. Meanwhile the engine's own
reduction is off (the ddp strategy's ``engine_reduces_grads``: every micro-step under ``no_sync``).
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn

from distrain.dist import all_reduce_sum, world_size


class Float64GradSum:
    """The step's gradients of ``params``, summed in float64 over micro-batches and ranks."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params: List[nn.Parameter] = [p for p in params if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        # the gradients, then one counter per parameter: how many micro-batches (over all ranks) gave it a gradient
        self.flat = torch.zeros(sum(sizes) + len(sizes), dtype=torch.float64, device=device)
        self.views = list(self.flat[:sum(sizes)].split(sizes))
        self.touched = self.flat[sum(sizes):]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._handles = [p.register_post_accumulate_grad_hook(self._move) for p in self.params]

    def _move(self, param: torch.Tensor) -> None:
        """After a backward accumulated ``param.grad``: add it to the float64 sum (exactly), and clear it."""
        i = self._index[id(param)]
        self.views[i].add_(param.grad.reshape(-1))
        self.touched[i] += 1
        param.grad = None

    def finish(self) -> int:
        """Sum over ranks (one float64 all-reduce) and give each parameter its float32 gradient; a parameter no
        micro-batch of any rank reached keeps no gradient, as under the engine's own reduction. Returns the bytes
        this rank all-reduced (0 alone)."""
        all_reduce_sum(self.flat)
        for param, view, touched in zip(self.params, self.views, self.touched.tolist()):
            param.grad = view.reshape(param.shape).to(param.dtype) if touched else None
        self.flat.zero_()
        return self.flat.numel() * self.flat.element_size() if world_size() > 1 else 0

    def remove(self) -> None:
        """Take the hooks off (the parameters' gradients accumulate as usual again)."""
        for handle in self._handles:
            handle.remove()
