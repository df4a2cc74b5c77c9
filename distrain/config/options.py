"""Typed options for the builders a config names: strategies, models and datasets (``strategy.kwargs`` and friends).

Each builder's keyword signature is its schema: ``options_schema`` turns it into a dataclass (one per builder,
types from the annotations, defaults from the signature, so neither is written twice), and ``parse_options`` checks
a config's kwargs against it with OmegaConf, the engine that checks the rest of the config. An unknown key or a
value of the wrong type is one ConfigError naming ``<section>.kwargs.<key>`` and what is allowed; the builder itself
only checks ranges and combinations.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import typing
from functools import lru_cache
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distrain.errors import ConfigError

_PRIMITIVES = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """The closest type OmegaConf can check; Any where it cannot (unions of containers, callables, tensors)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _PRIMITIVES or annotation is Any:
        return annotation
    if origin is typing.Union:
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and len(args) == 2:  # Optional[X]
            inner = _omegaconf_type(members[0])
            return Any if inner is Any else typing.Optional[inner]
        return Any
    if origin in (list, List, collections.abc.Sequence, Sequence, tuple, Tuple):
        inner = _omegaconf_type(args[0]) if args else Any
        return List[inner if inner in _PRIMITIVES else Any]
    if origin in (dict, Dict, collections.abc.Mapping, Mapping):
        return Dict[str, Any]
    return Any


def type_label(kind: Any) -> str:
    """A type as a config user reads it: int, str or null, list of str, mapping, any."""
    if kind is Any or kind is None:
        return "any"
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        return f"{type_label(args[0])} or null"
    if typing.get_origin(kind) in (list, List):
        return f"list of {type_label(args[0]) if args else 'any'}"
    if typing.get_origin(kind) in (dict, Dict):
        return "mapping"
    return getattr(kind, "__name__", str(kind))


@lru_cache(maxsize=None)
def options_schema(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> type:
    """A dataclass of ``builder``'s keyword parameters (all but ``skip``), named ``<Builder>Options``."""
    hints = typing.get_type_hints(builder)
    fields = []
    for name, param in inspect.signature(builder).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = MISSING if param.default is param.empty else param.default
        kind = _omegaconf_type(hints.get(name, Any))
        if isinstance(default, (list, dict)):
            fields.append((name, kind, dataclasses.field(default_factory=lambda d=default: type(d)(d))))
        else:
            fields.append((name, kind, dataclasses.field(default=default)))
    owner = getattr(builder, "__qualname__", "builder").split(".")[0]
    return dataclasses.make_dataclass(f"{owner[:1].upper()}{owner[1:]}Options", fields)


def describe_options(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> List[str]:
    """'name (type, default value)' for each option, for error messages and the config reference."""
    out = []
    for f in dataclasses.fields(options_schema(builder, skip)):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(f"{f.name} ({type_label(f.type)}, " + ("required" if default is MISSING else f"default {default!r}") + ")")
    return out


def parse_options(builder: Callable[..., Any], values: Mapping[str, Any], key: str, what: str,
                  skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """``values`` checked against ``builder``'s options and completed with its defaults, as plain keyword
    arguments. ``key`` is the config section they came from (``strategy.kwargs``), ``what`` names the builder
    in messages (``strategy 'fsdp'``)."""
    schema = options_schema(builder, tuple(skip))
    values = OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else dict(values)
    allowed = "; ".join(describe_options(builder, tuple(skip))) or "none"
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise ConfigError(f"Config key(s) {', '.join(f'{key}.{k}' for k in unknown)} not accepted by {what}. "
                          f"Allowed: {allowed}.", key=f"{key}.{unknown[0]}")
    for f in dataclasses.fields(schema):  # OmegaConf reads 2 or "yes" as true; a flag in our configs is true/false
        value = values.get(f.name, False)
        if f.type in (bool, typing.Optional[bool]) and not isinstance(value, bool) \
                and str(value).lower() not in ("true", "false") and not (value is None and f.type is not bool):
            raise ConfigError(f"Config key '{key}.{f.name}' has value {value!r}, which is not true or false "
                              f"for {what}. Allowed: {allowed}.", key=f"{key}.{f.name}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError) as err:
        field = str(getattr(err, "full_key", "") or "").split(".")[0] or "?"
        kind = type_label({f.name: f.type for f in dataclasses.fields(schema)}.get(field))
        raise ConfigError(f"Config key '{key}.{field}' has value {values.get(field)!r}, which is not a valid {kind} "
                          f"for {what}. Allowed: {allowed}.", key=f"{key}.{field}") from None
    except OmegaConfBaseException as err:  # a required option left out
        field = str(getattr(err, "full_key", "") or "").split(".")[0] or "?"
        raise ConfigError(f"{what} needs {key}.{field}. Allowed: {allowed}.", key=f"{key}.{field}") from None
