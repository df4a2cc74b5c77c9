"""Strategies by name (a Registry). Adding one is a file with a Strategy subclass and a line here; a user's own is
``strategy.name=package.module:ClassName``."""

from __future__ import annotations

from typing import Any, Dict

from distrain.registry import Registry
from distrain.strategies.base import Strategy, StrategyContext, make_strategy

# Built-ins as "module:Class", imported on use so a run never pays for engines it does not use (DeepSpeed: ~2 s).
STRATEGIES = Registry("strategy", "strategy.name", "Strategy subclass",
                      check=lambda cls: isinstance(cls, type) and issubclass(cls, Strategy), entries={
                          "single": "distrain.strategies.single:SingleStrategy",
                          "ddp": "distrain.strategies.ddp:DDPStrategy",
                          "zero1": "distrain.strategies.zero1:ZeRO1Strategy",
                          "fsdp": "distrain.strategies.fsdp:FSDPStrategy",
                          "deepspeed": "distrain.strategies.deepspeed_engine:DeepSpeedStrategy",
                          "accelerate": "distrain.strategies.accelerate_engine:AccelerateStrategy",
                          "local_sgd": "distrain.strategies.local_sgd:LocalSGDStrategy",
                      })


def strategy_class(name: str) -> type:
    """The Strategy class for a registered name, or for a user's own ``package.module:ClassName``."""
    return STRATEGIES.resolve(name)


def build_strategy(name: str, ctx: StrategyContext, kwargs: Dict[str, Any]) -> Strategy:
    return make_strategy(strategy_class(name), ctx, dict(kwargs))


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "build_strategy", "strategy_class"]
