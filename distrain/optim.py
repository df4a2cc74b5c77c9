"""Optimizers and the learning-rate schedule, built from ``train.*``.

The schedule is a pure function of the step (warmup, then constant or cosine), so a resumed run needs no
scheduler state: the lr at step s is ``lr_at(s)`` wherever and however often it restarts.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

import torch
from omegaconf import DictConfig
from torch import nn


# train.decay_exclude keywords (bias, norm, embedding, 1d); any other entry is a glob on parameter names
# (fnmatch), e.g. "*.pos.weight".
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


ShapeOf = Callable[[torch.Tensor], Sequence[int]]  # a parameter's whole shape (Strategy.param_shape)


def param_groups(model: nn.Module, train: DictConfig, shape: ShapeOf = lambda p: p.shape) -> List[Dict[str, Any]]:
    """The model's parameters as optimizer groups: those weight decay applies to, then those it does not.

    With ``train.weight_decay > 0``, parameters matching ``train.decay_exclude`` go into a second group with
    ``weight_decay: 0``: by default biases, normalisation weights and embeddings (GPT-2 / minGPT practice; decaying
    a LayerNorm's gain towards 0 or an embedding's rare rows is not regularisation). Keywords: ``bias`` (parameters
    named bias), ``norm`` (parameters of normalisation layers: torch's, or any class with "Norm" in its name),
    ``embedding`` (nn.Embedding/EmbeddingBag), ``1d`` (every parameter with fewer than 2 dimensions, nanoGPT's
    rule); any other entry is a glob on the parameter name. A parameter shared by several modules (tied weights)
    is excluded when any of its holders is. Without weight decay there is one group, as without the option.

    Every strategy builds its optimizer from these groups (ZeRO and DeepSpeed partition each group), so the groups
    and their order are the same under every strategy and in every checkpoint. ``shape`` gives a parameter's
    whole shape where the engine holds only a shard (``Strategy.param_shape``), for the ``1d`` rule.
    """
    named = list(model.named_parameters())
    rules = [str(r) for r in (getattr(train, "decay_exclude", None) or [])]
    if float(train.weight_decay) == 0 or not rules:
        return [{"params": [p for _, p in named]}]
    excluded = excluded_from_decay(model, rules, shape)
    decay = [p for name, p in named if name not in excluded]
    no_decay = [p for name, p in named if name in excluded]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def excluded_from_decay(model: nn.Module, rules: Sequence[str], shape: ShapeOf = lambda p: p.shape) -> Set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters ``rules`` exclude from weight decay."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    out: Set[str] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or id(p) not in canonical:
                continue
            full = f"{module_name}.{attr}" if module_name else attr
            if any(_matches(rule, full, attr, module, shape(p)) for rule in rules):
                out.add(canonical[id(p)])
    return out


def _matches(rule: str, name: str, attr: str, module: nn.Module, shape: Sequence[int]) -> bool:
    if rule == "bias":
        return attr == "bias"
    if rule == "norm":
        return isinstance(module, NORM_LAYERS) or "norm" in type(module).__name__.lower()
    if rule == "embedding":
        return isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    if rule == "1d":
        return len(shape) < 2
    return fnmatch.fnmatchcase(name, rule)


def build_optimizer(params: Iterable[Any], train: DictConfig, device: Optional[torch.device] = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named by train.optimizer over ``params``: parameters, or groups from ``param_groups``
    (already sharded/wrapped by the strategy), in the implementation ``train.optimizer_impl`` picks."""
    params = list(params)
    name = train.optimizer
    impl = implementation_kwargs(train, device)
    if name == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, **impl)
    betas = (float(train.betas[0]), float(train.betas[1]))
    if name == "adam":
        return torch.optim.Adam(params, lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay,
                                **impl)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay,
                                 **impl)
    raise AssertionError(f"train.optimizer={name!r} passed validation but has no builder")


def implementation_kwargs(train: DictConfig, device: Optional[torch.device]) -> Dict[str, bool]:
    """torch.optim's implementation switch for ``train.optimizer_impl``.

    ``auto``: the fused kernel on CUDA (one kernel for all parameters: the fastest, what nanoGPT uses), torch's own
    default elsewhere (the per-parameter loop on CPU). ``fused`` / ``foreach`` / ``for_loop`` force one; torch
    has fused SGD, Adam and AdamW on CUDA and CPU.
    """
    impl = str(getattr(train, "optimizer_impl", "auto"))  # a DictConfig or a plain namespace
    if impl == "auto":
        return {"fused": True} if device is not None and device.type == "cuda" else {}
    if impl == "fused":
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def optimizer_kwargs(train: DictConfig) -> dict:
    """The same hyper-parameters as keyword arguments, for engines that build the optimizer themselves."""
    if train.optimizer == "sgd":
        return {"lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}
    return {"lr": train.lr, "betas": [float(b) for b in train.betas], "eps": train.eps,
            "weight_decay": train.weight_decay}


def lr_at(step: int, train: DictConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine decay."""
    base = float(train.lr)
    if step < train.warmup_steps:
        return base * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return base
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = base * train.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
