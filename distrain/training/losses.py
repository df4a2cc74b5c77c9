"""Default losses per task, so a built-in run needs no loss in the config, and how each counts its items.

The language-model loss sums (it accepts ``num_items_in_batch``, the step's global count of labels that are not
-100), so padding counts for nothing and the objective is the exact global mean over tokens; the per-sample losses
stay means over their micro-batch, which distrain weights by micro/global (see distrain.training.objective).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from distrain.training.objective import IGNORE_INDEX, correct_and_count

LossFn = Callable[..., torch.Tensor]

__all__ = ["DEFAULT_ITEMS", "DEFAULT_LOSSES", "LossFn", "classification_cross_entropy", "correct_and_count",
           "default_items", "default_loss", "mse", "sequence_cross_entropy"]


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                           num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """Cross-entropy over every position of a (batch, time, vocab) output; targets of -100 (padding) are skipped.

    With ``num_items_in_batch`` (transformers' convention): the summed token losses / num_items_in_batch; without:
    the mean over this batch's valid tokens.
    """
    flat_logits, flat_targets = logits.flatten(0, -2).float(), targets.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    summed = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / num_items_in_batch


def classification_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.float(), targets.float())


DEFAULT_LOSSES = {"classification": classification_cross_entropy, "lm": sequence_cross_entropy, "regression": mse}
# What each default loss averages over: every sample once, or every token (every target element of unpadded
# windows, counted without a collective; padded text counts the labels that are not -100, all-reduced).
DEFAULT_ITEMS = {"classification": "samples", "lm": "elements", "regression": "samples"}


def default_loss(task: Optional[str]) -> Optional[LossFn]:
    return DEFAULT_LOSSES.get(task or "")


def default_items(spec: Any) -> Optional[str]:
    """The items of a built-in dataset's default loss (``spec``: its DataSpec, or None)."""
    task = getattr(spec, "task", None) or ""
    if task == "lm" and spec.extra.get("min_length"):
        return "labels"
    return DEFAULT_ITEMS.get(task)
