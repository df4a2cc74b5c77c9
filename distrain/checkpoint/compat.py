"""Which config changes a resume accepts: those that leave the trajectory alone, and nothing else.

May change (the next step is the same optimisation): how long to train, how often to log, evaluate and save,
the micro-batch (global_batch = micro x accum x world stays fixed, so only float rounding moves), the world
size, the process group settings and the run's location. May not change: the model, the data, the global
batch, the optimizer and its schedule, the precision, the seed and the strategy (the optimizer state's layout
and the trajectory depend on them). A forbidden change raises a CheckpointError naming every differing key.
"""

from __future__ import annotations

from typing import Any, Dict, List

from distrain.errors import CheckpointError

# Dotted prefixes of keys a resumed run may set differently from the run that saved.
MAY_CHANGE = (
    "run.name", "run.dir", "train.steps", "train.resume", "train.log_every", "train.eval_every", "train.micro_batch",
    "data.eval_batch", "dist", "checkpoint", "metrics", "faults",
)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a leaf, so adding kwargs is seen as a change."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in MAY_CHANGE)


def differing_keys(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Config keys that differ between the checkpoint's config and this run's, and that may not."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>") and not _may_change(k))


def check_resume_config(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> List[str]:
    """Raise CheckpointError if the config changed in a way that breaks the trajectory; returns notes to log."""
    bad = differing_keys(saved, current)
    if bad:
        a, b = flatten(saved), flatten(current)
        detail = "; ".join(f"{k}: {a.get(k, '<unset>')!r} in the checkpoint, {b.get(k, '<unset>')!r} now" for k in bad)
        raise CheckpointError(
            f"Cannot resume from {where}: the config changed in keys that shape the training trajectory ({detail}). "
            f"A resume may change only {', '.join(MAY_CHANGE)}. Restore those keys, start a new run "
            f"(run.name=... or train.resume=never), or resume from another checkpoint (train.resume=PATH).",
            key=bad[0])
    notes = []
    a, b = flatten(saved), flatten(current)
    if a.get("train.steps") != b.get("train.steps") and b.get("train.lr_schedule") == "cosine":
        notes.append(f"train.steps changed from {a.get('train.steps')} to {b.get('train.steps')}: the cosine "
                     f"schedule now decays over the new length")
    return notes
