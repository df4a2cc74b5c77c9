"""Which config changes a resume accepts: those that leave the trajectory alone, and nothing else.

The keys that may change are ``distrain.config.RESUME_MAY_CHANGE`` (one list, shared with the config hash). May
not change: the model, the data, the global batch, the optimizer and its schedule, the precision, the seed and the
strategy (the optimizer state's layout and the trajectory depend on them), except a change between exact strategies
with portable checkpoints (distrain.checkpoint.conversion decides and says so). A forbidden change raises a
CheckpointError naming every differing key. A key the checkpoint's config lacks (it was written before the key
existed) counts as its default, the behaviour of the version that wrote it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from distrain.config.schema import Config
from distrain.config.trajectory import (RESUME_MAY_CHANGE, flatten, may_change_on_resume,
                                       may_change_on_strategy_change, without_changeable)
from distrain.errors import CheckpointError


def _flat_pair(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Both configs flattened, the saved one completed with the schema's defaults for keys added since."""

    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    a, b = flatten(saved), flatten(current)
    return {**{k: v for k, v in defaults.items() if k in b}, **a}, b


def differing_keys(saved: Dict[str, Any], current: Dict[str, Any], strategy_converts: bool = False) -> List[str]:
    """Config keys that differ between the checkpoint's config and this run's, and that may not;
    ``strategy_converts``: the strategy section may (an exact conversion, distrain.checkpoint.conversion)."""
    return _differing(*_flat_pair(without_changeable(saved), without_changeable(current)), strategy_converts)


def _differing(a: Dict[str, Any], b: Dict[str, Any], strategy_converts: bool = False) -> List[str]:
    return sorted(k for k in set(a) | set(b)
                  if a.get(k, "<unset>") != b.get(k, "<unset>") and not may_change_on_resume(k)
                  and not (strategy_converts and may_change_on_strategy_change(k)))


def check_resume_config(saved: Dict[str, Any], current: Dict[str, Any], where: str,
                        strategy_converts: bool = False) -> List[str]:
    """Raise CheckpointError if the config changed in a way that breaks the trajectory; returns notes to log.
    ``strategy_converts``: the strategy section may change (an exact conversion, distrain.checkpoint.conversion)."""
    a, b = _flat_pair(saved, current)
    bad = differing_keys(saved, current, strategy_converts)
    if bad:
        detail = "; ".join(f"{k}: {a.get(k, '<unset>')!r} in the checkpoint, {b.get(k, '<unset>')!r} now" for k in bad)
        raise CheckpointError(
            f"Cannot resume from {where}: the config changed in keys that shape the training trajectory ({detail}). "
            f"A resume may change only {', '.join(RESUME_MAY_CHANGE)} (and the strategy, between exact ones). Restore those keys, start a new run under "
            f"another run.name, or resume from another checkpoint (train.resume=PATH).",
            key=bad[0])
    notes = []
    if a.get("train.steps") != b.get("train.steps") and b.get("train.lr_schedule") == "cosine":
        notes.append(f"train.steps changed from {a.get('train.steps')} to {b.get('train.steps')}: the cosine "
                     f"schedule now decays over the new length")
    return notes
