"""Default losses and accuracy per task, so a built-in run needs no loss in the config."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position of a (batch, time, vocab) output, averaged over tokens."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def classification_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.float(), targets.float())


DEFAULT_LOSSES = {"classification": classification_cross_entropy, "lm": sequence_cross_entropy, "regression": mse}


def default_loss(task: Optional[str]) -> Optional[LossFn]:
    return DEFAULT_LOSSES.get(task or "")


def correct_and_count(outputs: torch.Tensor, targets: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(correct predictions, predictions) when the output looks like class logits for integer targets, else None."""
    if targets.is_floating_point() or outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        return None
    predictions = outputs.argmax(dim=-1)
    return int((predictions == targets).sum()), targets.numel()
