"""Loading the config: YAML file, dict or Config object, then ``key=value`` overrides, merged onto the schema.

OmegaConf errors (unknown key, wrong type, bad YAML) become one ConfigError naming the dotted key and what is
allowed; ``validate`` then checks ranges.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from distrain.config.schema import Config, ConfigSource
from distrain.config.validation import validate
from distrain.errors import ConfigError


def _describe_omegaconf_error(err: OmegaConfBaseException, origin: str, layer: Any = None) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the dotted key and what is allowed."""
    key = getattr(err, "full_key", None)
    if not key:  # OmegaConf names no key when a whole section is given a plain value (`train=5`)
        section = _section_given_a_value(layer)
        if section is None:
            return ConfigError(f"Config problem in {origin}: {_first_line(err)}", key="config")
        name, value = section
        return ConfigError(f"Config key '{name}' is a section, not a value ({value!r} in {origin}). Set the keys "
                           f"inside it instead (for example {name}.{_allowed_keys(name)[0]}=...); keys in "
                           f"'{name}': {', '.join(_allowed_keys(name))}.", key=name)
    if isinstance(err, InterpolationResolutionError):
        hint = (" An interpolation must name an existing key (e.g. ${model.name}) or a set environment variable "
                "(${oc.env:VAR}, or ${oc.env:VAR,default}).") if "not found" in str(err) else ""
        return ConfigError(f"Config key '{key}' in {origin} does not resolve: {_first_line(err)}.{hint}",
                           key=str(key))
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        parent, _, leaf = str(key).rpartition(".")
        allowed = _allowed_keys(parent)
        hint = f" Allowed keys in '{parent or 'the top level'}': {', '.join(allowed)}." if allowed else ""
        return ConfigError(f"Unknown config key '{key}' in {origin}.{hint}", key=str(key))
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        expected = _declared_type(str(key)) or getattr(err, "ref_type", None) or getattr(err, "object_type", None)
        want = f"a valid {_type_name(expected)}" if expected is not None else "of the declared type"
        return ConfigError(f"Config key '{key}' has value {value!r} in {origin}, which is not {want}.", key=str(key))
    return ConfigError(f"Config problem at '{key}' in {origin}: {_first_line(err)}", key=str(key))


def _first_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's own message without the full_key/reference_type lines it appends."""
    text = str(getattr(err, "msg", None) or err)
    return " ".join(text.strip().splitlines()[0].split()) if text.strip() else type(err).__name__


def _section_given_a_value(layer: Any) -> Optional[tuple]:
    """(name, value) of a top-level section that ``layer`` sets to a plain value, or None."""
    if not isinstance(layer, DictConfig):
        return None
    sections = OmegaConf.structured(Config)
    for name in layer.keys():
        if name in sections and isinstance(sections[name], DictConfig) and not isinstance(layer[name], DictConfig):
            return str(name), OmegaConf.to_container(layer, resolve=False)[name]
    return None


def _declared_type(key: str) -> Any:
    """The annotated type of a dotted key in the schema (e.g. int for train.steps), or None."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        tp = fields[part].type
        cls = fields[part].default_factory if dataclasses.is_dataclass(fields[part].default_factory) else None
    return tp


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None) or str(tp)
    return name.replace("typing.", "")


def _allowed_keys(section: str) -> List[str]:
    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, section) if section else node
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _load_yaml(path: Union[str, os.PathLike]) -> DictConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file '{path}' is a directory. Pass the path to a YAML file inside it, for example "
                          f"configs/quickstart.yaml.", key="CONFIG")
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist (or is not a file). Pass the path to a YAML file, "
                          f"for example configs/quickstart.yaml.", key="CONFIG")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report line/column, not a traceback
        detail = " ".join(str(err).split())
        raise ConfigError(f"Config file '{path}' is not valid YAML: {detail}", key="CONFIG") from None
    if isinstance(loaded, DictConfig) and not loaded:
        raise ConfigError(f"Config file '{path}' is empty (or holds only comments): it would train the built-in "
                          f"defaults. Put the sections you mean in it (run, model, data, train, ...); "
                          f"configs/quickstart.yaml is a complete example.", key="CONFIG")
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (run, model, data, train, ...), "
                          f"not a {type(loaded).__name__}.", key="CONFIG")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override '{item}' is not of the form key=value (for example train.steps=50).",
                              key=item)
    for item in overrides:  # one at a time, so the paragraph names the one that does not parse
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"Override '{item}' could not be parsed: {' '.join(str(err).split())}. Its value is "
                              f"read as YAML, where * & ! | > % @ ` and a leading [ or {{ mean something: quote such a "
                              f"value, e.g. {item.partition('=')[0]}='[\"*\"]' in the shell.",
                              key=item.partition("=")[0]) from None
    return OmegaConf.from_dotlist(list(overrides))


def load_config(source: ConfigSource = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the typed config from a YAML path, a dict or a Config, then apply ``key=value`` overrides.

    Raises ConfigError for unknown keys, wrong types and out-of-range values (world-independent checks).
    """
    schema = OmegaConf.structured(Config)
    layers: List[tuple] = []
    if isinstance(source, (str, os.PathLike)):
        layers.append((_load_yaml(source), f"config file '{source}'"))
    elif isinstance(source, Config):
        layers.append((OmegaConf.structured(source), "the Config object"))
    elif isinstance(source, (Mapping, DictConfig)):
        layers.append((OmegaConf.create(dict(source) if not isinstance(source, DictConfig) else source), "the config dict"))
    elif source is not None:
        raise ConfigError(f"config must be a YAML path, a dict or a distrain Config, not {type(source).__name__}.",
                          key="config")
    if overrides:
        layers.append((_parse_overrides(overrides), "the command-line overrides"))
    cfg = schema
    for layer, origin in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _describe_omegaconf_error(err, origin, layer) from None
    OmegaConf.set_readonly(cfg, False)
    try:
        OmegaConf.resolve(cfg)  # every ${...} now, so one that does not resolve is a config error, not a traceback
    except OmegaConfBaseException as err:
        raise _describe_omegaconf_error(err, "the config") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
