"""One way to extend distrain: a registry of names, and ``package.module:object`` for your own.

Strategies, models, datasets, trackers and cluster environments are each a ``Registry``. A built-in is a name mapped
to its object, or to where it lives (``"package.module:object"``, imported on first use so a run never pays for an
engine it does not use). Your own is named in the config by its import path, ``strategy.name=mypkg.engine:MyDDP``,
``model.name=mypkg.models:make_net``, ``data.name=mypkg.data:make_sets``, ``metrics.trackers=[mypkg.log:MyTracker]``
(``DISTRAIN_ENVIRONMENTS=mypkg.cluster:MyCluster`` for an environment, which is read before any config), or
registered from Python with ``MODELS.register("name", builder)``. docs/architecture.md, "Adding a strategy /
environment / dataset / tracker / model", lists what each needs.
"""

from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Any, Callable, Dict, Iterator, Optional, TypeVar, Union

from distrain.errors import ConfigError

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    """Whether ``name`` is a ``package.module:object`` path rather than a registered name."""
    module, sep, attr = str(name).partition(":")
    return bool(sep and module and attr)


def import_object(path: str, key: str) -> Any:
    """The object ``package.module:object`` names; a ConfigError naming ``key`` when it does not import."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # ImportError, AttributeError, or the module's own error at import
        raise ConfigError(f"{key}={path!r} cannot be loaded: {type(err).__name__}: {err}. The module must be "
                          f"importable on every rank (on PYTHONPATH, or installed).", key=key) from None
    return obj


class Registry(MutableMapping):
    """Names of one kind of extension (``kind``, chosen by config key ``key``), in registration order; a dict
    of name -> object otherwise (``registry[name] = obj`` registers too).

    ``registry[name]`` is the object registered as ``name`` (imported on first use); ``registry.resolve(name)``
    also accepts a user's ``package.module:object`` and checks what it finds with ``check`` (what it must be:
    ``expects``), with errors that name ``key``.
    """

    def __init__(self, kind: str, key: str, expects: str, check: Optional[Callable[[Any], bool]] = None,
                 entries: Optional[Dict[str, Union[str, Any]]] = None, hint: str = ""):
        self.kind = kind
        self.key = key
        self.expects = expects
        self.hint = hint  # another way to bring your own, said after the import path (e.g. the Trainer argument)
        self._check = check
        self._entries: Dict[str, Union[str, Any]] = dict(entries or {})

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` (an object, or ``"package.module:object"``) as ``name``; without ``obj``, a decorator."""
        if obj is None:
            def decorator(target: T) -> T:
                self[name] = target
                return target

            return decorator
        self[name] = obj
        return obj

    def __getitem__(self, name: str) -> Any:
        target = self._entries[name]
        if isinstance(target, str):  # imported on first use, then kept
            target = self._entries[name] = import_object(target, self.key)
        return target

    def __setitem__(self, name: str, obj: Any) -> None:
        self._entries[name] = obj

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, name: str) -> Any:
        """The object ``name`` stands for: a registered name, or a user's ``package.module:object``."""
        if name in self._entries:
            obj = self[name]
        elif is_import_path(name):
            obj = import_object(name, self.key)
        else:
            kinds = self.kind[:-1] + "ies" if self.kind.endswith("y") else self.kind + "s"
            raise ConfigError(f"Unknown {self.kind} {self.key}={name!r}. Built-in {kinds}: "
                              f"{', '.join(sorted(self))}; or your own {self.expects} as 'package.module:object'"
                              f"{self.hint}.", key=self.key)
        if self._check is not None and not self._check(obj):
            raise ConfigError(f"{self.key}={name!r} is not a {self.expects} (it is {obj!r}).", key=self.key)
        return obj
