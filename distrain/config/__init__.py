"""The one config: schema (dataclasses), loading (YAML + ``key=value`` overrides), validation, and which keys shape
the trajectory. Import what you need from here; the submodules say where each part lives."""

from distrain.config.trajectory import RESUME_MAY_CHANGE, config_hash, flatten, may_change_on_resume
from distrain.config.loading import load_config, to_container, to_yaml
from distrain.config.schema import (CHOICES, FAULT_SIGNALS, CheckpointConfig, Config, ConfigSource, DataConfig,
                                    DistConfig, FaultsConfig, MetricsConfig, ModelConfig, RunConfig, StrategyConfig,
                                    TrainConfig)
from distrain.config.validation import BatchPlan, batch_plan, surprises, validate

__all__ = ["CHOICES", "FAULT_SIGNALS", "BatchPlan", "CheckpointConfig", "Config", "ConfigSource", "DataConfig",
           "DistConfig", "FaultsConfig", "MetricsConfig", "ModelConfig", "RESUME_MAY_CHANGE", "RunConfig",
           "StrategyConfig", "TrainConfig", "batch_plan", "config_hash", "flatten", "load_config",
           "may_change_on_resume", "surprises", "to_container", "to_yaml", "validate"]
