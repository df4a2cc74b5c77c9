"""Divergence guards: what a non-finite loss or gradient norm does (``train.on_nonfinite``), decided alike on all ranks.

Every step, before the optimizer update, each rank computes a code on the device: 1 when its loss (its share of the
step's objective) is not finite, +2 when the gradient norm is not finite (only on steps that measured it anyway:
clipping, or a logged step). No parameter is read on the hot path. fp16 gradient norms are left out: a dynamic loss
scale overflows now and then by design, and the scaler skips those updates itself.

    stop       raise DivergenceError (exit 1) naming the first non-finite step and the ranks;
    skip_step  drop the step's gradients without an update, on every rank - unless the weights themselves are no
               longer finite (a finite loss with non-finite gradients a step earlier), which no skip can mend: stop;
    warn       log it (once per report) and go on.

skip_step must know before the update, so it reduces every rank's code there (one small all-reduce per step: the
price of asking for it). stop and warn cost no collective, no host sync and no device op per step: each rank keeps
references to its steps' losses and measured norms, and ``settle`` checks them at once on the device and reduces the
first non-finite step and a count (one all-reduce of two numbers per rank) where
the loop synchronises anyway: on log steps (the logged loss is reduced there), before a checkpoint is saved, and after
the last step. So a run stops at most ``train.log_every`` steps after it diverged, naming the step it diverged at, and
nothing non-finite is ever committed: the Checkpointer runs ``check_before_save`` first at every save, which settles
and then checks the weights themselves (``nonfinite_weight_ranks``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

from distrain import dist
from distrain.checkpoint.paths import read_latest
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


class DivergenceGuard:
    """Checks each step's loss (and measured gradient norm) on every rank alike, and acts per ``train.on_nonfinite``."""

    def __init__(self, mode: str, strategy: Any, device: torch.device, precision: str, checkpoints: Path,
                 log: logging.Logger, before_settle: Callable[[], None] = lambda: None):
        """``before_settle``: a collective check run first at every settle, whose error names the cause of a
        non-finite loss better than the guard can (an empty micro-batch under a mean loss: Objective.settle_items)."""
        if mode == "skip_step" and strategy.opaque_step:
            raise ConfigError(f"train.on_nonfinite=skip_step cannot be honoured by strategy {strategy.name!r}: its "
                              f"engine clips, measures and applies the update in one call, so a step cannot be "
                              f"skipped from outside. Use train.on_nonfinite=stop or warn.", key="train.on_nonfinite")
        self.mode = mode
        self.before_settle = before_settle
        self.strategy = strategy
        self.device = device
        self.check_grad_norm = precision != "fp16" and not strategy.opaque_step
        self.checkpoints = checkpoints
        self.log = log
        self.nonfinite_steps = 0  # steps with a non-finite loss or gradient norm (skipped, or warned about)
        self._streak = False
        # stop / warn: (step, loss, grad norm) of each step since the last settle, checked there all at once: a step
        # pays a list append, not the handful of tiny device ops (~40 us on a CPU) a per-step code would cost
        self._pending: List[Tuple[int, torch.Tensor, Any]] = []

    def allows_update(self, step: int, loss: torch.Tensor, grad_norm: Any) -> bool:
        """Once per step before the update (``step`` counts from 1): whether to apply it. skip_step decides now (a
        collective); stop and warn only keep the step's loss and norm for ``settle``."""
        if self.mode == "skip_step":
            return self._decide(step, [float(c) for c in dist.per_rank(self._code(loss, grad_norm))])
        # stop / warn: keep references only; the codes are computed for all the steps at once in settle
        self._pending.append((step, loss.detach(), grad_norm if self.check_grad_norm else None))
        return True

    def _code(self, loss: torch.Tensor, grad_norm: Any) -> torch.Tensor:
        """A step's code on the device: LOSS when its loss is not finite, + GRAD_NORM when its measured norm is not."""
        code = torch.isfinite(loss.detach()).logical_not().double()
        if grad_norm is not None and self.check_grad_norm:
            if torch.is_tensor(grad_norm):
                code = code + GRAD_NORM * torch.isfinite(grad_norm.detach()).logical_not().double().to(code.device)
            elif not math.isfinite(grad_norm):
                code = code + GRAD_NORM
        return code

    def _noted(self) -> Optional[torch.Tensor]:
        """[first non-finite step packed with its code (step x 4 + code; -1: none), count] of the steps since the last
        settle, on the device; None when there were none (alike on every rank)."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        codes = torch.stack([self._code(loss, norm).reshape(()) for _, loss, norm in pending])
        steps = torch.tensor([step for step, _, _ in pending], dtype=torch.float64, device=codes.device)
        packed = torch.where(codes > 0, codes + 4.0 * steps, torch.full_like(codes, math.inf)).min()
        return torch.stack([torch.where(torch.isinf(packed), -1.0, packed), (codes > 0).sum().double()])

    def settle(self) -> None:
        """Collective (every rank, at the same points): act on the steps noted since the last settle (stop / warn).
        Called on log steps, before a checkpoint is saved, and after the last step."""
        self.before_settle()
        noted = self._noted()
        if noted is None:  # no step since the last settle, alike on every rank: no collective
            return
        per_rank = dist.per_rank_vector(noted)  # [first packed step and code, count] of every rank
        firsts = [int(first) for first, _ in per_rank if first >= 0]
        if not firsts:
            self._streak = False
            return
        step = min(firsts) // 4
        codes = [float(int(first) % 4) if first >= 0 and int(first) // 4 == step else 0.0 for first, _ in per_rank]
        later = int(max(count for _, count in per_rank)) - 1
        self._decide(step, codes, later)

    def check_before_save(self, step: int, scheduled: bool) -> bool:
        """The Checkpointer's ``before_save`` (collective, before every save): settle the steps noted since the last
        settle, then whether the weights may be saved. Non-finite weights are never saved: a DivergenceError, or,
        for a scheduled save under train.on_nonfinite=warn, a warning and False (training goes on)."""
        self.settle()
        bad = self.strategy.nonfinite_weight_ranks()
        if not bad:
            return True
        latest = read_latest(self.checkpoints)
        message = (f"Not saving checkpoint step {step}: the weights are not finite (nan or inf) on rank(s) "
                   f"{', '.join(map(str, bad))}: training has diverged. A checkpoint of non-finite weights is never "
                   f"committed; " + (f"{self.checkpoints / latest} stays the latest." if latest else
                                     "there is no earlier checkpoint."))
        if not scheduled or self.mode != "warn":
            raise DivergenceError(f"{message} Lower train.lr or set train.grad_clip, and start again.")
        if dist.rank() == 0:
            self.log.warning(f"{message} Training goes on (train.on_nonfinite=warn).")
        return False

    def _decide(self, step: int, codes: List[float], later: int = 0) -> bool:
        """Act on non-finite ``codes`` (per rank) of ``step``; ``later``: further non-finite steps noted since."""
        if not any(codes):
            self._streak = False
            return True
        self.nonfinite_steps += 1 + later
        what = _describe(codes) + (f" (and on {later} later step(s) since)" if later else "")
        if self.mode == "stop":
            raise DivergenceError(f"Training diverged at step {step}: {what} (train.on_nonfinite=stop). "
                                  f"{self._advice()}")
        if self.mode == "warn":
            if not self._streak:
                self.log.warning(f"step {step}: {what}; going on (train.on_nonfinite=warn)")
            self._streak = True
            return True
        broken = self.strategy.nonfinite_weight_ranks()
        if broken:
            raise DivergenceError(f"Training diverged at step {step}: {what}, and the weights themselves are no longer "
                                  f"finite on rank(s) {', '.join(map(str, broken))} (an earlier update had non-finite "
                                  f"gradients), which skipping steps cannot mend. {self._advice()}")
        self.log.warning(f"step {step}: {what}; skipped its update on every rank (train.on_nonfinite=skip_step)")
        return False

    def _advice(self) -> str:
        latest = read_latest(self.checkpoints)
        kept = (f"The latest checkpoint, {self.checkpoints / latest}, holds finite weights (a checkpoint of non-finite "
                f"weights is never committed)." if latest else "No checkpoint was committed.")
        return (f"{kept} Lower train.lr, set train.grad_clip, or warm up longer (train.warmup_steps), and start again; "
                f"train.on_nonfinite=skip_step skips such steps instead.")


__all__ = ["DivergenceGuard"]
