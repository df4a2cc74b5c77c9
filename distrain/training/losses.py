"""Default losses per task, so a built-in run needs no loss in the config, and how each counts its items.

The language-model loss sums (it accepts ``num_items_in_batch``, the step's global count of labels that are not
-100), so padding counts for nothing and the objective is the exact global mean over tokens; the per-sample losses
stay means over their micro-batch, which distrain weights by micro/global (see distrain.training.objective).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from distrain.errors import ConfigError
from distrain.training.objective import IGNORE_INDEX, correct_and_count

LossFn = Callable[..., torch.Tensor]

__all__ = ["DEFAULT_ITEMS", "DEFAULT_LOSSES", "LossFn", "classification_cross_entropy", "correct_and_count",
           "default_items", "default_loss", "mse", "resolve_loss", "sequence_cross_entropy"]


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


def resolve_loss(loss_fn: Optional[LossFn], step_fn: Optional[Callable[..., Any]], task: Optional[str],
                 sample: Callable[[], Any]) -> Optional[LossFn]:
    """The loss the objective uses: the caller's (none with a ``step_fn``), else the built-in task's. None only for
    Mapping batches a model computes its own loss from; a ConfigError when ``sample()`` (a batch of one) is not one."""
    if loss_fn is not None or step_fn is not None:
        return loss_fn
    loss = default_loss(task)
    if loss is None and not isinstance(sample(), Mapping):
        raise ConfigError("No loss function: the training data has no built-in task and its samples are not "
                          "Mappings a model could compute its own loss from (Hugging Face style, with "
                          "'labels'), so pass loss_fn=... to distrain.Trainer (any callable (output, target) -> "
                          "scalar), or step_fn=... .", key="loss_fn")
    return loss
