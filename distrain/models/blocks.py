"""A model's repeated blocks: the units that torch.compile, activation checkpointing and FSDP's auto wrap use.

"auto" means every child of an ``nn.ModuleList`` (the usual container of transformer blocks: the built-in GPT's
``blocks``, torchtitan's ``layers``, a Hugging Face model's ``h``/``layers``); the MLP, CNN and LSTM have none. A
list of class names instead picks every submodule of those classes, for a model that keeps its blocks elsewhere.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from distrain.errors import ConfigError

AUTO = "auto"


def find_blocks(model: nn.Module, policy: Optional[Sequence[str]], key: str) -> List[nn.Module]:
    """The blocks of ``model`` under ``policy`` (None or "auto": children of nn.ModuleLists; else class names),
    in the order the model holds them. ``key`` is the config key named when a class name matches nothing."""
    if policy is None or (isinstance(policy, str) and policy == AUTO) or list(policy) == [AUTO]:
        return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    names = [str(name) for name in policy]
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    missing = [name for name in names if name not in {type(m).__name__ for m in blocks}]
    if missing:
        raise ConfigError(f"{key} names {missing}, but the model has no submodule of that class. Its classes: "
                          f"{sorted({type(m).__name__ for m in model.modules()})}.", key=key)
    return blocks
