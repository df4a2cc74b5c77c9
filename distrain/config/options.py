"""Typed options for the builders a config names: strategies, models and datasets (``strategy.kwargs`` and friends).

Each builder's keyword signature is its schema: ``options_schema`` turns it into a dataclass (one per builder,
types from the annotations, defaults from the signature, so neither is written twice), and ``parse_options`` checks
a config's kwargs against it with OmegaConf, the engine that checks the rest of the config. An unknown key, a
value of the wrong type or out of its range is one ConfigError naming ``<section>.kwargs.<key>`` and what is allowed;
the builder itself only checks combinations (``min_length <= block_size``) and facts (a path that exists).

Every numeric option declares its allowed range in the signature, next to its type, with ``Range``::

    def __init__(self, ctx, bucket_cap_mb: Annotated[float, Range(gt=0)] = 25.0,
                 stage: Annotated[int, Range(one_of=(0, 1, 2, 3), note="the ZeRO stage")] = 0,
                 limit: Annotated[Optional[int], Range(ge=1)] = None): ...

tests/test_options.py fails for a registered builder with a numeric option that declares none.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import typing
from functools import lru_cache
from typing import Annotated, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distrain.errors import ConfigError

_PRIMITIVES = (int, float, bool, str)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option allows: bounds inclusive (``ge``, ``le``) or strict (``gt``, ``lt``), or a few
    ``one_of``; ``note`` says what the number means, for the error message. A float must also be finite."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    one_of: Tuple[float, ...] = ()
    note: str = ""

    def admits(self, value: Any) -> bool:
        """Whether ``value`` (a number, after the type check) lies in the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.one_of:
            return value in self.one_of
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The range as a reader writes it: '> 0', '>= 1', 'in [0, 1)', 'one of 1, 3'."""
        if self.one_of:
            return "one of " + ", ".join(_number(v) for v in self.one_of)
        low = (f"[{_number(self.ge)}" if self.ge is not None else
               f"({_number(self.gt)}" if self.gt is not None else None)
        high = (f"{_number(self.le)}]" if self.le is not None else
                f"{_number(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return "any finite number"


def _number(value: float) -> str:
    """2**32 rather than 4294967296; 25 rather than 25.0."""
    if isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _strip(annotation: Any) -> Tuple[Any, Optional[Range]]:
    """(the type without ``Annotated``, its declared Range or None)."""
    if typing.get_origin(annotation) is Annotated:
        declared = [m for m in annotation.__metadata__ if isinstance(m, Range)]
        return annotation.__origin__, (declared[0] if declared else None)
    return annotation, None


def _is_numeric(annotation: Any) -> bool:
    """int or float (not bool), optional or in a list: an option that needs a Range."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, list, List, collections.abc.Sequence, tuple, Tuple):
        return any(_is_numeric(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _omegaconf_type(annotation: Any) -> Any:
    """The closest type OmegaConf can check; Any where it cannot (unions of containers, callables, tensors)."""
    annotation = _strip(annotation)[0]
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


def _options(builder: Callable[..., Any], skip: Tuple[str, ...]) -> Dict[str, Tuple[Any, Any]]:
    """{option name: (its annotation, Annotated kept; its default or MISSING)} of ``builder``'s keyword parameters
    (all but ``skip``)."""
    hints = typing.get_type_hints(builder, include_extras=True)
    return {name: (hints.get(name, Any), MISSING if param.default is param.empty else param.default)
            for name, param in inspect.signature(builder).parameters.items()
            if name not in skip and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}


@lru_cache(maxsize=None)
def options_schema(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> type:
    """A dataclass of ``builder``'s keyword parameters (all but ``skip``), named ``<Builder>Options``."""
    fields = []
    for name, (hint, default) in _options(builder, skip).items():
        kind = _omegaconf_type(hint)
        if isinstance(default, (list, dict)):
            fields.append((name, kind, dataclasses.field(default_factory=lambda d=default: type(d)(d))))
        else:
            fields.append((name, kind, dataclasses.field(default=default)))
    owner = getattr(builder, "__qualname__", "builder").split(".")[0]
    return dataclasses.make_dataclass(f"{owner[:1].upper()}{owner[1:]}Options", fields)


@lru_cache(maxsize=None)
def option_ranges(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> Dict[str, Range]:
    """{option: its declared Range} for the options of ``builder`` that declare one."""
    declared = {name: _strip(hint)[1] for name, (hint, _) in _options(builder, skip).items()}
    return {name: found for name, found in declared.items() if found is not None}


def numeric_options(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> List[str]:
    """The options of ``builder`` typed int or float (optional, or a list of them): each should declare a Range."""
    return [name for name, (hint, _) in _options(builder, skip).items() if _is_numeric(_strip(hint)[0])]


def describe_options(builder: Callable[..., Any], skip: Tuple[str, ...] = ()) -> List[str]:
    """'name (type, range, default value)' for each option, for error messages and the config reference."""
    out = []
    ranges = option_ranges(builder, skip)
    for f in dataclasses.fields(options_schema(builder, skip)):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        allowed = f", {ranges[f.name].describe()}" if f.name in ranges else ""
        out.append(f"{f.name} ({type_label(f.type)}{allowed}, "
                   + ("required" if default is MISSING else f"default {default!r}") + ")")
    return out


def check_ranges(options: Mapping[str, Any], ranges: Mapping[str, Range], key: str, what: str) -> None:
    """A ConfigError naming ``<key>.<option>``, its value and its range for the first option out of range."""
    for name, allowed in ranges.items():
        value = options.get(name)
        values = value if isinstance(value, list) else [value]
        # A word in place of a number (fsdp's replicate=auto) is the builder's to check.
        if all(v is None or isinstance(v, str) or allowed.admits(v) for v in values):
            continue
        number = "an integer " if all(isinstance(v, int) for v in values if v is not None) else "a number "
        subject = "each entry" if isinstance(value, list) else "it"
        note = f" ({allowed.note})" if allowed.note else ""
        raise ConfigError(f"Config key '{key}.{name}' has value {value!r}, which is out of range for {what}: "
                          f"{subject} must be {'' if allowed.one_of else number}{allowed.describe()}{note}.",
                          key=f"{key}.{name}")


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
        options = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except (ValidationError, ConfigKeyError) as err:
        field = str(getattr(err, "full_key", "") or "").split(".")[0] or "?"
        kind = type_label({f.name: f.type for f in dataclasses.fields(schema)}.get(field))
        raise ConfigError(f"Config key '{key}.{field}' has value {values.get(field)!r}, which is not a valid {kind} "
                          f"for {what}. Allowed: {allowed}.", key=f"{key}.{field}") from None
    except OmegaConfBaseException as err:  # a required option left out
        field = str(getattr(err, "full_key", "") or "").split(".")[0] or "?"
        raise ConfigError(f"{what} needs {key}.{field}. Allowed: {allowed}.", key=f"{key}.{field}") from None
    check_ranges(options, option_ranges(builder, tuple(skip)), key, what)  # type: ignore[arg-type]
    return options  # type: ignore[return-value]
