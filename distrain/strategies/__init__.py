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
}


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise ConfigError(f"Unknown strategy strategy.name={name!r}. Available: {', '.join(STRATEGIES)}.",
                          key="strategy.name")
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_strategy(name: str, ctx: StrategyContext, kwargs: Dict[str, Any]) -> Strategy:
    return make_strategy(strategy_class(name), ctx, dict(kwargs))


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "build_strategy", "strategy_class"]
