"""Bringing a DDP rank whose last micro-step failed (out of memory) back in step with its peers' bucket all-reduces.

The peers of a rank that ran out of memory are inside DDP's gradient all-reduces of the last (syncing) backward,
one per bucket, launched in bucket order as each bucket's gradients become ready. The failed rank issues the
all-reduces it has not yet issued, through DDP's own reducer, so the collectives match one for one:

* its last forward never completed (it failed there, or in an earlier micro-step and stopped): the reducer is
  prepared as DDP's forward prepares it (``prepare_for_backward([])``), and a backward of zero gradients over
  every parameter marks each one ready, so every bucket is all-reduced in order and DDP finalises the backward;
* it failed inside the last backward: the parameters whose gradients were accumulated (seen by a post-accumulate
  hook, which runs just before DDP's) are already marked; a zero-gradient backward over the others marks the
  rest, launches the remaining buckets and finalises, exactly as the interrupted backward would have.

Where every parameter was marked before the failure (the OOM struck after the last gradient, before DDP's final
callback), nothing is left to issue and the reducer cannot be finalised: ``join`` says so and the step is not
recoverable (every rank then ends in one paragraph). The zero gradients reach the buckets; no rank keeps them:
the step is dropped everywhere and redone. docs/out-of-memory.md has the whole protocol.
"""

from __future__ import annotations

from typing import List, Set

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class BackwardJoin:
    """Tracks which parameters' gradients the current syncing backward has accumulated, and joins the rest."""

    def __init__(self, model: DistributedDataParallel):
        self.model = model
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.ready: Set[int] = set()
        self.armed = False  # whether the micro-step under way is the syncing (last) one
        for p in self.params:  # runs just before DDP's own hook on the gradient accumulator
            p.register_post_accumulate_grad_hook(self._accumulated)

    def _accumulated(self, param: torch.Tensor) -> None:
        self.ready.add(id(param))

    def arm(self, last_micro_step: bool) -> None:
        """A micro-step starts: whether it syncs; nothing of its backward is accumulated yet."""
        self.armed = last_micro_step
        self.ready.clear()

    def join(self) -> bool:
        """Issue the bucket all-reduces this rank still owes in the syncing backward; False where none is left to
        issue and DDP's reducer cannot be finalised (the step cannot be redone)."""
        missing = [p for p in self.params if not self.armed or id(p) not in self.ready]
        if not missing:
            return False
        if len(missing) == len(self.params):  # no forward reached DDP's post-forward, or it did and backward never
            self.model.reducer.prepare_for_backward([])  # began: what DDP's forward does (find_unused is refused)
        for p in missing:  # one parameter at a time: one gradient-sized zero tensor alive at once
            torch.autograd.backward(p, torch.zeros_like(p))
        return True

    def reset(self) -> None:
        """Before the step is redone: every rank broadcasts buffers in its next forward alike (DDP decides it
        from the previous forward, which differs on a rank that stopped early)."""
        self.model.require_forward_param_sync = True
        self.arm(False)
