"""Model registry: a name maps to a builder that reads the dataset's shapes, and kwargs override defaults."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Dict, Optional

from torch import nn

from distrain.data.datasets import DataSpec
from distrain.config.options import Range, parse_options
from distrain.errors import ConfigError
from distrain.registry import Registry

# A width, depth or count of a built-in model (model.kwargs), declared in its builder's signature.
Size = Annotated[int, Range(ge=1)]

ModelBuilder = Callable[..., nn.Module]
# model.name -> builder(spec, **model.kwargs) -> nn.Module; a user's own by its import path.
MODELS = Registry("model", "model.name", "builder(spec=..., **kwargs) -> nn.Module", check=callable,
                  hint=", or an nn.Module passed to distrain.Trainer(model=...)")
# name -> (built model, data spec) -> training FLOPs per sample (forward + backward), for throughput and MFU.
FlopsFn = Callable[[nn.Module, DataSpec], float]
MODEL_FLOPS: Dict[str, FlopsFn] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(spec: DataSpec, **kwargs) -> nn.Module`` under ``name`` (usable as model.name)."""

    return MODELS.register(name)


def register_flops(name: str) -> Callable[[FlopsFn], FlopsFn]:
    """Register ``flops(model, spec) -> float``: training FLOPs per sample of the built-in model ``name``."""

    def deco(fn: FlopsFn) -> FlopsFn:
        MODEL_FLOPS[name] = fn
        return fn

    return deco


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``model.name`` (or a user's ``package.module:function``), else a ConfigError."""
    return MODELS.resolve(name)


def build_model(name: str, kwargs: Dict[str, Any], spec: Optional[DataSpec]) -> nn.Module:
    """Build a registered model for data described by ``spec``; config errors name model.name/model.kwargs."""
    builder = model_builder(name)
    kwargs = parse_options(builder, kwargs, "model.kwargs", f"model {name!r}", skip=("spec",))
    if spec is None:
        raise ConfigError(f"model.name={name!r} needs to know the data's shapes, but the dataset has no `spec`. "
                          f"Pass your own nn.Module with model=..., or use a built-in dataset.", key="model.name")
    try:
        return builder(spec=spec, **kwargs)  # the options fit its signature: a TypeError inside is its own
    except ValueError as err:  # a builder's refusal of these kwargs or this data; anything else is its own bug
        raise ConfigError(f"model {name!r} cannot be built with model.kwargs={dict(kwargs)} on {spec.task} data: "
                          f"{err}", key="model.kwargs") from None
