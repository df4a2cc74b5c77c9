"""Divergence guards: what a non-finite loss or gradient norm does (``train.on_nonfinite``), decided alike on all ranks.

Once per step, before the optimizer update, every rank puts a code into its own slot of a world-size vector: 1 when
its loss (the sum of its micro-batch losses) is not finite, +2 when the gradient norm is not finite (only on steps
that measured it before the update anyway: clipping, or a logged step). One all-reduce gives every rank the same
vector, so every rank takes the same decision; no parameter is read on the hot path. fp16 gradient norms are left
out: a dynamic loss scale overflows now and then by design, and the scaler skips those updates itself.

    stop       raise DivergenceError (exit 1) naming the step and the ranks;
    skip_step  drop the step's gradients without an update, on every rank - unless the weights themselves are no
               longer finite (a finite loss with non-finite gradients a step earlier), which no skip can mend: stop;
    warn       log it (once per streak of non-finite steps) and go on.

skip_step must know before the update, so it waits for the reduction there. stop and warn need not: the reduction
runs in the background while the step goes on, and the verdict is read one step later, or before a checkpoint is
saved, or after the last step (``settle``) - the step named is the one that was not finite. Checkpoints are guarded
apart, at save time (``nonfinite_weight_ranks``): non-finite weights are never committed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from distrain import dist
from distrain.errors import ConfigError, DivergenceError

LOSS, GRAD_NORM = 1, 2  # the bits of a rank's code


def _ranks(codes: List[float], bit: int) -> List[int]:
    return [r for r, code in enumerate(codes) if int(code) & bit]


def _describe(codes: List[float]) -> str:
    parts = []
    loss, norm = _ranks(codes, LOSS), _ranks(codes, GRAD_NORM)
    if loss:
        parts.append(f"the loss is not finite (nan or inf) on rank(s) {', '.join(map(str, loss))}")
    if norm:
        parts.append("the gradient norm is not finite" + (f" on rank(s) {', '.join(map(str, norm))}"
                                                           if len(norm) < len(codes) else ""))
    return " and ".join(parts)


def nonfinite_weight_ranks(model: nn.Module, device: torch.device) -> List[int]:
    """The ranks whose weights (their local shards) hold a nan or inf; the same list on every rank (collective)."""
    flags = []
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3 keeps the shard apart, the parameter empty
        local = local if local is not None else (p.to_local() if hasattr(p, "to_local") else p)  # FSDP2 DTensor
        if local.numel():
            flags.append(torch.isfinite(local.detach()).all().logical_not())
    bad = torch.stack([f.to(device) for f in flags]).any().float() if flags else torch.zeros((), device=device)
    return [r for r, v in enumerate(dist.per_rank(bad.to(device))) if v]


class DivergenceGuard:
    """Checks each step's loss (and measured gradient norm) on every rank alike, and acts per ``train.on_nonfinite``."""

    def __init__(self, mode: str, strategy: Any, device: torch.device, precision: str, checkpoints: Path,
                 log: logging.Logger):
        if mode == "skip_step" and strategy.opaque_step:
            raise ConfigError(f"train.on_nonfinite=skip_step cannot be honoured by strategy {strategy.name!r}: its "
                              f"engine clips, measures and applies the update in one call, so a step cannot be "
                              f"skipped from outside. Use train.on_nonfinite=stop or warn.", key="train.on_nonfinite")
        self.mode = mode
        self.strategy = strategy
        self.device = device
        self.check_grad_norm = precision != "fp16" and not strategy.opaque_step
        self.checkpoints = checkpoints
        self.log = log
        self.nonfinite_steps = 0  # steps with a non-finite loss or gradient norm (skipped, or warned about)
        self._streak = False
        self._pending: Optional[Tuple[int, dist.PerRank]] = None  # stop / warn: a step's check still in flight

    def allows_update(self, step: int, loss_sum: torch.Tensor, grad_norm: Any) -> bool:
        """Collective, once per step before the update (``step`` counts from 1): whether to apply it.

        skip_step decides now; stop and warn start this step's check and act on the previous step's (which finished
        in the background meanwhile).
        """
        code = torch.isfinite(loss_sum.detach()).logical_not().float()
        if grad_norm is not None and self.check_grad_norm:
            if torch.is_tensor(grad_norm):
                code = code + GRAD_NORM * torch.isfinite(grad_norm.detach()).logical_not().float().to(code.device)
            elif not math.isfinite(grad_norm):
                code = code + GRAD_NORM
        if self.mode == "skip_step":
            return self._decide(step, dist.per_rank(code))
        self.settle()
        self._pending = (step, dist.PerRank(code))
        return True

    def settle(self) -> None:
        """Act on the check still in flight (stop / warn): before a checkpoint is saved, and after the last step."""
        if self._pending is not None:
            step, flags = self._pending
            self._pending = None
            self._decide(step, flags.result())

    def _decide(self, step: int, codes: List[float]) -> bool:
        if not any(codes):
            self._streak = False
            return True
        self.nonfinite_steps += 1
        what = _describe(codes)
        if self.mode == "stop":
            raise DivergenceError(f"Training diverged at step {step}: {what} (train.on_nonfinite=stop). "
                                  f"{self._advice()}")
        if self.mode == "warn":
            if not self._streak:
                self.log.warning(f"step {step}: {what}; going on (train.on_nonfinite=warn)")
            self._streak = True
            return True
        broken = nonfinite_weight_ranks(self.strategy.model, self.device)
        if broken:
            raise DivergenceError(f"Training diverged at step {step}: {what}, and the weights themselves are no longer "
                                  f"finite on rank(s) {', '.join(map(str, broken))} (an earlier update had non-finite "
                                  f"gradients), which skipping steps cannot mend. {self._advice()}")
        self.log.warning(f"step {step}: {what}; skipped its update on every rank (train.on_nonfinite=skip_step)")
        return False

    def _advice(self) -> str:
        from distrain.checkpoint.layout import read_latest

        latest = read_latest(self.checkpoints)
        kept = (f"The latest checkpoint, {self.checkpoints / latest}, holds finite weights (a checkpoint of non-finite "
                f"weights is never committed)." if latest else "No checkpoint was committed.")
        return (f"{kept} Lower train.lr, set train.grad_clip, or warm up longer (train.warmup_steps), and start again; "
                f"train.on_nonfinite=skip_step skips such steps instead.")


__all__ = ["DivergenceGuard", "nonfinite_weight_ranks"]
