"""Strategies by name. Adding one is a file with a Strategy subclass and a line here."""

from __future__ import annotations

import importlib
from typing import Any, Dict

from distrain.errors import ConfigError
from distrain.strategies.base import Strategy, StrategyContext, make_strategy

# name -> "module:Class", imported on use so a run never pays for engines it does not use (DeepSpeed: ~2 s).
STRATEGIES: Dict[str, str] = {
    "single": "distrain.strategies.single:SingleStrategy",
    "ddp": "distrain.strategies.ddp:DDPStrategy",
    "zero1": "distrain.strategies.zero1:ZeRO1Strategy",
    "fsdp": "distrain.strategies.fsdp:FSDPStrategy",
    "deepspeed": "distrain.strategies.deepspeed_engine:DeepSpeedStrategy",
    "accelerate": "distrain.strategies.accelerate_engine:AccelerateStrategy",
    "local_sgd": "distrain.strategies.local_sgd:LocalSGDStrategy",
}


def strategy_class(name: str) -> type:
    """The Strategy class for a registered name, or for a user's own ``package.module:ClassName``."""
    target = STRATEGIES.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(f"Unknown strategy strategy.name={name!r}. Available: {', '.join(STRATEGIES)}, or your "
                          f"own Strategy subclass as 'package.module:ClassName'.", key="strategy.name")
    module, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy.name={name!r} cannot be loaded: {err}.", key="strategy.name") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy.name={name!r} is not a distrain Strategy subclass.", key="strategy.name")
    return cls


def build_strategy(name: str, ctx: StrategyContext, kwargs: Dict[str, Any]) -> Strategy:
    return make_strategy(strategy_class(name), ctx, dict(kwargs))


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "build_strategy", "strategy_class"]
