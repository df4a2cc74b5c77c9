"""Checks that need more than the schema, run once before any worker starts (launch, verify, config show)."""

from __future__ import annotations

from omegaconf import DictConfig

from distrain.config import BatchPlan, batch_plan
from distrain.errors import ConfigError


def preflight(cfg: DictConfig, world_size: int) -> BatchPlan:
    """The batch plan for ``world_size``, after checking that the named strategy, model and dataset exist."""
    plan = batch_plan(cfg, world_size)  # before the imports below pull in torch: batch mistakes fail in 0.3 s
    from distrain.data import DATASETS
    from distrain.models import MODELS
    from distrain.strategies import strategy_class

    strategy_class(cfg.strategy.name)
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"Unknown dataset data.name={cfg.data.name!r}. Built-in datasets: {', '.join(DATASETS)}.",
                          key="data.name")
    if cfg.model.name not in MODELS:
        raise ConfigError(f"Unknown model model.name={cfg.model.name!r}. Built-in models: "
                          f"{', '.join(sorted(MODELS))}.", key="model.name")
    return plan
