"""Bringing an FSDP2 rank that ran out of memory back in step with its peers (``train.micro_batch=auto``).

FSDP2 communicates in every micro-step, not only in the last backward as DDP does: each unit all-gathers its
parameters in the forward (and again in the backward with ``reshard_after_forward``), and the syncing (last)
backward reduce-scatters every unit's gradients. A rank that runs out of memory anywhere in a step leaves its
peers inside, or on their way to, collectives that only it can match, and they learn of the failure only at the
end of the step. So the failed rank issues exactly the collectives its peers still expect, in their order:

1. A ledger counts the all-gathers and reduce-scatters this rank has issued in the current micro-step. It sits in
   FSDP's own communication slots (``set_custom_all_gather`` / ``set_custom_reduce_scatter``), wrapping the comm
   already installed, so every collective of a unit's group passes through it and nothing else changes.
2. After the OOM, FSDP's per-iteration state is reset with torch's own ``FSDPModule.reset_iter_state`` (waits for
   collectives in flight, reshards every group, clears the training states).
3. The failed micro-step is replayed: a forward of one sample and a backward of a zero loss, under the same
   ``set_requires_gradient_sync`` as the failed attempt. FSDP's hooks issue the same sequence of collectives
   as any micro-step of the model (it does not depend on the batch size); the ledger skips the first N, the ones
   the failed attempt issued already (a skipped all-gather yields zeros), so the replay joins its peers exactly
   where they are. Every later micro-step of the step is replayed the same way, with nothing skipped, the last
   one syncing. The peers' sequence ends with the last unit's reduce-scatter; so does the failed rank's.
4. Every rank then learns the outcome from one all-reduce of a flag (``any_rank_failed``); on failure every rank
   drops the step's gradients and the step is redone smaller (the trainer's part).

The replayed gradients are junk (zeros mixed with what the failed attempt accumulated); they reach the peers'
reduce-scatters, but every rank drops the step. What cannot be recovered: an OOM inside the replay itself (one
sample's activations), collectives a model issues itself inside its forward (not FSDP's), and HSDP's gradient
all-reduce on the replicate group (not counted here). docs/out-of-memory.md, section FSDP, has the protocol.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.utils._pytree import tree_leaves, tree_map


class CollectiveLedger:
    """How many FSDP collectives this rank issued in the current micro-step, and how many a replay still skips."""

    def __init__(self) -> None:
        self.issued = 0
        self.skip = 0

    def begin_micro_step(self) -> None:
        self.issued = 0

    def passes(self, output: torch.Tensor) -> bool:
        """Whether the next collective goes out; a skipped one (already issued before the OOM) yields zeros."""
        if self.skip > 0:
            self.skip -= 1
            output.zero_()
            return False
        self.issued += 1
        return True


class _Counted:
    """A unit's comm, counted by the ledger; allocation and the collective itself stay the wrapped comm's."""

    def __init__(self, inner: Any, ledger: CollectiveLedger):
        self.inner, self.ledger = inner, ledger

    def allocate(self, size: Sequence[Any], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)


class _LedgerAllGather(_Counted, AllGather):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> Optional[dist.Work]:
        if not self.ledger.passes(output_tensor):
            return None  # FSDP treats a missing work as a finished synchronous all-gather
        return self.inner(output_tensor, input_tensor, group, async_op)


class _LedgerReduceScatter(_Counted, ReduceScatter):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> Optional[dist.Work]:
        if not self.ledger.passes(output_tensor):
            return None
        return self.inner(output_tensor, input_tensor, group, op, async_op)


class FSDPOomRecovery:
    """Installed once on a sharded model (after ``fully_shard`` of every unit, before training); then, per step:

    * ``begin_micro_step()`` at the start of every micro-step (the strategy's ``accumulate``);
    * on this rank's OOM in micro-step ``i`` of ``n``: ``owed_collectives_after_oom(shadow_forward, i, n)``,
      then, on every rank, ``any_rank_failed(...)`` after the step's micro-steps, and the step is dropped and
      redone where it says so.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, FSDPModule):
            raise TypeError(f"FSDPOomRecovery needs the root module fully_shard was applied to, not "
                            f"{type(model).__name__}")
        self.model = model
        self.ledger = CollectiveLedger()
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                for group in unit._get_fsdp_state()._fsdp_param_groups:  # one group per unit without shard_placement_fn
                    unit.set_custom_all_gather(_LedgerAllGather(group._all_gather_comm, self.ledger))
                    unit.set_custom_reduce_scatter(_LedgerReduceScatter(group._reduce_scatter_comm, self.ledger))

    def begin_micro_step(self) -> None:
        """A micro-step starts: the ledger counts its collectives from zero."""
        self.ledger.begin_micro_step()

    def owed_collectives_after_oom(self, shadow_forward: Callable[[], Any], micro_step: int,
                                   micro_steps: int) -> None:
        """On the rank that ran out of memory in micro-step ``micro_step`` (0-based) of ``micro_steps``: issue
        every collective its peers still expect in this step, in their order, and leave FSDP ready for the redo.

        ``shadow_forward()`` runs the model's forward on a small input (one sample) and returns its output (any
        nesting of tensors); it is run once per micro-step left, the failed one included."""
        issued = self.ledger.issued
        reset_after_oom(self.model)
        for j in range(micro_step, micro_steps):
            self.ledger.skip = issued if j == micro_step else 0
            self.model.set_requires_gradient_sync(j == micro_steps - 1)
            _zero_backward(shadow_forward())
            if self.ledger.skip:  # the replay issued fewer collectives than the failed attempt: not the same model
                raise RuntimeError(f"FSDP OOM recovery: the replay of micro-step {j} issued {issued - self.ledger.skip}"
                                   f" collectives, the failed attempt {issued}; the model's forward is not "
                                   f"the same from one micro-step to the next, so the peers cannot be matched")
        self.ledger.begin_micro_step()


def reset_after_oom(model: nn.Module) -> None:
    """FSDP's per-iteration state after an exception mid-forward or mid-backward, back to idle and resharded
    (torch's ``reset_iter_state`` on the root); gradients the failed iteration was accumulating are discarded."""
    if not isinstance(model, FSDPModule):
        raise TypeError(f"reset_after_oom needs the root module fully_shard was applied to, not {type(model).__name__}")
    model.reset_iter_state()


HSDP_UNCOUNTED = "all-reduces gradients on a second process group that the out-of-memory replay does not count"


def unsupported(model: nn.Module) -> Optional[str]:
    """Why a failed rank of this sharded model cannot be brought back in step (None: it can)."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule) and any(group._is_hsdp for group in unit._get_fsdp_state()._fsdp_param_groups):
            return f"HSDP (a replicate dimension) {HSDP_UNCOUNTED}"
    return None


def first_sample(batch: Any) -> Any:
    """``batch`` cut to its first sample (every tensor's first row): the input of a replay, which only has to
    reach FSDP's hooks, as cheaply as the model allows."""
    return tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def _zero_backward(output: Any) -> None:
    """A backward of zero through every differentiable output: FSDP's backward hooks, and so its collectives, run
    as for a real loss; the gradients are zero (or whatever the failed attempt left; the step is dropped)."""
    tensors: List[torch.Tensor] = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors:
        torch.autograd.backward(tensors, [torch.zeros_like(t) for t in tensors])


def any_rank_failed(failed: bool, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> bool:
    """One all-reduce of a flag after the step's last reduce-scatter: whether any rank ran out of memory."""
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)
