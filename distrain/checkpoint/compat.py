"""Which config changes a resume accepts: those that leave the trajectory alone, and nothing else.

The keys that may change are ``distrain.config.RESUME_MAY_CHANGE`` (one list, shared with the config hash). May
not change: the model, the data, the global batch, the optimizer and its schedule, the precision, the seed and the
strategy (the optimizer state's layout and the trajectory depend on them). A forbidden change raises a CheckpointError naming every differing key.
"""

from __future__ import annotations

from typing import Any, Dict, List

from distrain.config.identity import RESUME_MAY_CHANGE, flatten, may_change_on_resume
from distrain.errors import CheckpointError

def differing_keys(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Config keys that differ between the checkpoint's config and this run's, and that may not."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>") and not may_change_on_resume(k))


def check_resume_config(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> List[str]:
    """Raise CheckpointError if the config changed in a way that breaks the trajectory; returns notes to log."""
    bad = differing_keys(saved, current)
    if bad:
        a, b = flatten(saved), flatten(current)
        detail = "; ".join(f"{k}: {a.get(k, '<unset>')!r} in the checkpoint, {b.get(k, '<unset>')!r} now" for k in bad)
        raise CheckpointError(
            f"Cannot resume from {where}: the config changed in keys that shape the training trajectory ({detail}). "
            f"A resume may change only {', '.join(RESUME_MAY_CHANGE)}. Restore those keys, start a new run under "
            f"another run.name, or resume from another checkpoint (train.resume=PATH).",
            key=bad[0])
    notes = []
    a, b = flatten(saved), flatten(current)
    if a.get("train.steps") != b.get("train.steps") and b.get("train.lr_schedule") == "cosine":
        notes.append(f"train.steps changed from {a.get('train.steps')} to {b.get('train.steps')}: the cosine "
                     f"schedule now decays over the new length")
    return notes
