"""Whether a resume runs on the data its checkpoint was trained on: the fingerprints
(``distrain.data.fingerprint``) of the checkpoint and of this run, compared, and what differs named.

The data position is a function of the step, so on other data a resume would train on other samples than the run
it continues (and evaluate on another eval set) without a word. ``train.resume_data=check`` (the default) refuses
that in one paragraph (a ConfigError, exit 2); ``accept`` resumes with a warning. A checkpoint written before data
fingerprints were recorded is resumed with a note.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from distrain.errors import ConfigError

KEY = "train.resume_data"
_NAMED = 3  # shards or items named in a message at most


def check_resume_data(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]], policy: str, where: str,
                      log: logging.Logger) -> List[str]:
    """Raise a ConfigError naming what differs if the data changed and ``policy`` is "check"; returns notes for
    the resume line (a warning is logged instead when ``policy`` is "accept")."""
    if current is None:  # a checkpointer given no fingerprint (nothing to compare with)
        return []
    if saved is None:
        return ["the checkpoint records no fingerprint of its data (written before data fingerprints): the data "
                "are not compared"]
    found = {role: differences(saved.get(role), current.get(role)) for role in ("train", "eval")}
    detail = "; ".join(f"{role} data: {', '.join(d)}" for role, d in found.items() if d)
    if not detail:
        return []
    if policy == "accept":
        log.warning(f"resume: the data differ from those checkpoint {where} was trained on ({detail}); resuming on "
                    f"them as {KEY}=accept says: the run continues at its step, on these data")
        return []
    raise ConfigError(
        f"Cannot resume from {where}: the data differ from those it was trained on ({detail}). A resume continues "
        f"the data position by step, so on other data it would silently train on other samples than the run it "
        f"continues. Restore the data, start a new run (another run.name, or train.resume=never), or set "
        f"{KEY}=accept to resume on these data.", key=KEY)


def differences(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> List[str]:
    """What differs between two fingerprints of one role, in a few words each ([] when they match)."""
    if saved is None or current is None:
        if saved is current:
            return []
        return ["none in the checkpoint, some now" if saved is None else "some in the checkpoint, none now"]
    if saved.get("kind") != current.get("kind"):
        return [f"{_kind(saved)} in the checkpoint, {_kind(current)} now"]
    found = []
    if saved.get("length") != current.get("length"):
        unit = "windows" if saved.get("kind") == "tokens" else "items"
        found.append(f"{saved.get('length'):,} {unit} in the checkpoint, {current.get('length'):,} now")
    if saved.get("kind") == "tokens":
        return found + _shard_differences(saved, current)
    if saved.get("spec") != current.get("spec"):
        found.append(f"spec {saved.get('spec')} in the checkpoint, {current.get('spec')} now")
    if not found:
        found += _sample_differences(saved.get("samples"), current.get("samples"))
    return found


def _kind(fingerprint: Dict[str, Any]) -> str:
    return "token shards" if fingerprint.get("kind") == "tokens" else "a data set"


def _shard_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    found = [f"{key} {saved.get(key)} in the checkpoint, {current.get(key)} now"
             for key in ("split", "block_size", "first") if saved.get(key) != current.get(key)]
    before = {s["file"]: s for s in saved.get("shards", [])}
    now = {s["file"]: s for s in current.get("shards", [])}
    changed = []
    for name in sorted(set(before) | set(now)):
        a, b = before.get(name), now.get(name)
        if a is None or b is None:
            changed.append(f"shard {name} {'added' if a is None else 'gone'}")
        elif a["tokens"] != b["tokens"]:
            changed.append(f"shard {name} has {b['tokens']:,} tokens, {a['tokens']:,} in the checkpoint")
        elif a.get("sha256") and b.get("sha256") and a["sha256"] != b["sha256"]:
            changed.append(f"shard {name} has other contents (sha256)")
    more = f" and {len(changed) - _NAMED} more shard(s)" if len(changed) > _NAMED else ""
    return found + ([", ".join(changed[:_NAMED]) + more] if changed else [])


def _sample_differences(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> List[str]:
    if not saved or not current or saved.get("indices") != current.get("indices"):
        return []  # one side could not be fingerprinted beyond its length (said when it was recorded)
    changed = [i for i, a, b in zip(saved["indices"], saved["sha256"], current["sha256"]) if a != b]
    if not changed:
        return []
    return [f"the same length, but the items at {', '.join(map(str, changed[:_NAMED]))}"
            + (f" (and {len(changed) - _NAMED} more of {len(saved['indices'])} sampled)" if len(changed) > _NAMED
               else f" (of {len(saved['indices'])} sampled)") + " differ"]
