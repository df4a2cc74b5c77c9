"""Loading the config: YAML file, dict or Config object, then ``key=value`` overrides, merged onto the schema.

OmegaConf errors (unknown key, wrong type, bad YAML) become one ConfigError naming the dotted key and what is
allowed; ``validate`` then checks ranges.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distrain.config.schema import Config, ConfigSource
from distrain.config.validation import validate
from distrain.errors import ConfigError


def _describe_omegaconf_error(err: OmegaConfBaseException, origin: str) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the dotted key and what is allowed."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        parent, _, leaf = str(key).rpartition(".")
        allowed = _allowed_keys(parent)
        hint = f" Allowed keys in '{parent or 'the top level'}': {', '.join(allowed)}." if allowed else ""
        return ConfigError(f"Unknown config key '{key}' in {origin}.{hint}", key=str(key))
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        expected = _declared_type(str(key)) or getattr(err, "ref_type", None) or getattr(err, "object_type", None)
        want = _type_name(expected) if expected is not None else "the declared type"
        return ConfigError(
            f"Config key '{key}' has value {value!r} in {origin}, which is not a valid {want}.", key=str(key)
        )
    return ConfigError(f"Config problem at '{key}' in {origin}: {err.msg if hasattr(err, 'msg') else err}", key=str(key))


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
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (run, model, data, train, ...), "
                          f"not a {type(loaded).__name__}.", key="CONFIG")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override '{item}' is not of the form key=value (for example train.steps=50).",
                              key=item)
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"Overrides {list(overrides)} could not be parsed: {err}", key="overrides") from None


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
            raise _describe_omegaconf_error(err, origin) from None
    OmegaConf.set_readonly(cfg, False)
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
