"""Your own model, data and loss under `distrain verify`: a function that returns distrain.Trainer's arguments.

``--trainer-args MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) names a zero-argument function returning a
dict of Trainer keyword arguments: ``model``, ``train_data``, ``loss_fn``, ``step_fn``, ``frozen``, ``items``. Each
rank of every world size calls it, so it must build the same objects everywhere (seeded data, a model factory).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict

from distrain.errors import UsageError

ACCEPTED = ("model", "train_data", "loss_fn", "step_fn", "frozen", "items")
FLAG = "--trainer-args"


def load_function(spec: str) -> Callable[[], Dict[str, Any]]:
    """The function ``spec`` names (``package.module:function`` or ``file.py:function``), without calling it."""
    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise UsageError(f"{FLAG} {spec!r} must name a function as MODULE:FUNCTION or path/to/file.py:FUNCTION, e.g. "
                         f"mypackage.training:trainer_args.")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"{FLAG} {spec!r}: no file {target}.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as err:
        raise UsageError(f"{FLAG} {spec!r}: cannot import {target}: {err}. Run verify from the directory that "
                         f"holds it, or put it on PYTHONPATH.") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"{FLAG} {spec!r}: {target} has no function {name!r}.")
    return function


def trainer_args(spec: str) -> Dict[str, Any]:
    """Call the function ``spec`` names and check that it returned Trainer keyword arguments."""
    args = load_function(spec)()
    if not isinstance(args, dict):
        raise UsageError(f"{FLAG} {spec!r} returned a {type(args).__name__}; it must return a dict of "
                         f"distrain.Trainer keyword arguments ({', '.join(ACCEPTED)}).")
    unknown = sorted(set(args) - set(ACCEPTED))
    if unknown:
        raise UsageError(f"{FLAG} {spec!r} returned {unknown}, which verify does not take. Allowed: "
                         f"{', '.join(ACCEPTED)} (verify compares training only, so no eval_data or metrics).")
    return args
