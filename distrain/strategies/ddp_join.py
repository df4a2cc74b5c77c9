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

from typing import Any, Callable, List, Optional, Set

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distrain.strategies.comm_hooks import ByteCounter, Rider


class Outcome(Rider):
    """Whether any rank's step attempt failed: each rank's 1 (failed) or 0, summed inside the all-reduce of the
    syncing backward's last gradient bucket (comm_hooks.Rider), so the outcome costs no collective of its own. A
    rank that failed says so before it joins (and so launches the last bucket). Only after a failure does
    micro_steps all-reduce every rank's details (where it failed, its memory)."""

    def __init__(self, device: torch.device):
        super().__init__(1, device)

    def fail(self) -> None:
        """This rank's attempt failed (before it joins; the last bucket must not have left yet)."""
        self.values.fill_(1.0)

    def any_failed(self) -> Optional[bool]:
        """Whether some rank failed, once the backward is done; None if no last bucket carried the outcome in this
        attempt (a compressing comm hook: micro_steps then all-reduces the outcome itself)."""
        return bool(self.values.item() > 0) if self.carried else None


class BackwardJoin:
    """Tracks which parameters' gradients the current syncing backward has accumulated, and joins the rest."""

    def __init__(self, model: DistributedDataParallel, counter: ByteCounter):
        """``counter``: the byte counter DDP's comm hook reports to; the outcome rides inside its last bucket."""
        self.model = model
        self.outcome = Outcome(next(model.parameters()).device)
        counter.rider = self.outcome
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        # the parameters accumulated so far (tensors hash by identity); the hook runs just before DDP's own hook
        # on the gradient accumulator, once per parameter and backward: the set's own add, no Python frame of ours
        self.ready: Set[torch.Tensor] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self.ready.add) for p in self.params]

    def arm(self) -> None:
        """A micro-step starts: nothing of its backward is accumulated yet."""
        self.ready.clear()

    def join(self, last: bool) -> bool:
        """Issue the bucket all-reduces this rank still owes in the syncing backward (``last``: the failed
        micro-step was that one; otherwise none of it ran); False where none is left to issue and DDP's reducer
        cannot be finalised (the step cannot be redone)."""
        missing = [p for p in self.params if not last or p not in self.ready]
        if not missing:
            return False
        if len(missing) == len(self.params):  # no forward reached DDP's post-forward, or it did and backward never
            self.model.reducer.prepare_for_backward([])  # began: what DDP's forward does (find_unused is refused)
        for p in missing:  # one parameter at a time: one gradient-sized zero tensor alive at once
            torch.autograd.backward(p, torch.zeros_like(p))
        return True

    def close(self) -> None:
        """Remove the hooks: the model may be trained again, by another Trainer."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reset(self) -> None:
        """Before the step is redone: every rank broadcasts buffers in its next forward alike (DDP decides it
        from the previous forward, which differs on a rank that stopped early)."""
        self.model.require_forward_param_sync = True
        self.arm()


class JoinsDDPBackward:
    """The micro_batch=auto methods of a strategy whose gradients DDP's reducer syncs (ddp, accelerate), mixed in
    before Strategy: ``_join`` is its BackwardJoin (W > 1 under auto), else None."""

    _join: Optional[BackwardJoin] = None

    def rejoin_after_oom(self, micro: int, micro_steps: int, phase: str, replay: Callable[[], Any]) -> bool:
        return self._join is None or self._join.join(last=micro == micro_steps - 1)

    def outcome_channel(self) -> Optional[Outcome]:
        return None if self._join is None else self._join.outcome
