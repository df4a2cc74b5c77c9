"""The model a Trainer is given (a built module, a zero-argument factory, or none: the config's registry name) and
how it is built: on the meta device when the strategy can shard or place it from there (distrain.models.meta_init),
else whole on every rank."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, List, Union

from omegaconf import DictConfig
from torch import nn

from distrain.errors import ConfigError
from distrain.models.meta_init import MetaBuildRefused, build_on_meta
from distrain.models.registry import build_model

ModelSource = Union[nn.Module, Callable[[], nn.Module], None]
META_HINT = ("To build it sharded from birth, let every module initialise its own parameters in reset_parameters() "
             "or init_weights(), called at the end of its __init__ (docs/large-models.md); model.init=eager silences "
             "this message")
# How the model was built (BuiltModel.init), as the start-up line says it.
MODEL_INIT = {"meta": "on the meta device and initialised per shard", "eager": "whole on every rank",
              "object": "by the caller"}


@dataclass
class BuiltModel:
    module: nn.Module
    init: str  # object (passed built) | meta | eager
    notes: List[str]  # why it was not built on the meta device, for the run's log


def _not_a_model(got: Any) -> ConfigError:
    return ConfigError(f"model must be an nn.Module or a zero-argument function returning one; got "
                       f"{type(got).__name__}.", key="model")


def build_user_model(model: ModelSource, cfg: DictConfig, spec: Any, *, meta_capable: bool,
                     explain: bool) -> BuiltModel:
    """The model to hand the strategy. ``cfg``: the whole config (model.*, strategy.name); ``spec``: a built-in
    dataset's DataSpec; ``meta_capable``: the strategy can take a model on the meta device; ``explain``: note why a
    model could not be built there (rank 0)."""
    if isinstance(model, nn.Module):
        return BuiltModel(model, "object", [])  # already materialised; for one that does not fit, pass a factory
    if model is None:
        factory: Callable[[], Any] = functools.partial(build_model, cfg.model.name, cfg.model.kwargs, spec)
    elif callable(model):
        factory = model
    else:
        raise _not_a_model(model)
    if cfg.model.init == "meta" and not meta_capable:
        raise ConfigError(f"model.init=meta, but strategy.name={cfg.strategy.name!r} takes a built model (its class "
                          f"does not set meta_init = True). Use model.init=auto or eager, or a built-in strategy.",
                          key="model.init")
    notes: List[str] = []
    if meta_capable and cfg.model.init != "eager":
        try:
            return _checked(build_on_meta(factory), "meta", notes)
        except MetaBuildRefused as why:
            if cfg.model.init == "meta":
                raise ConfigError(f"model.init=meta, but this model cannot be built on the meta device with its "
                                  f"eager initial values: {why}. {META_HINT}", key="model.init") from None
            if explain:
                notes.append(f"The model is built whole on every rank, not on the meta device: {why}. {META_HINT}")
    return _checked(factory(), "eager", notes)


def _checked(built: Any, init: str, notes: List[str]) -> BuiltModel:
    if not isinstance(built, nn.Module):
        raise _not_a_model(built)
    return BuiltModel(built, init, notes)


__all__ = ["BuiltModel", "MODEL_INIT", "ModelSource", "build_user_model"]
