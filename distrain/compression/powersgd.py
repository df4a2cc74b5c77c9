"""PowerSGD's state, kept across a resume: each rank's error feedback, warm-start factors, iteration and RNG.

torch's ``PowerSGDState`` lives inside the DDP comm hook and is rebuilt empty by a new process, which silently
restarts the warm-up and forgets the accumulated compression error. Here it becomes plain tensors plus a JSON
description, saved per rank in the checkpoint (``compression/rank<r>.safetensors``) and put back at the same world
size. At another world size the buckets hold other ranks' shares, so the state is reset, and the resume says so.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

# The per-bucket tensors PowerSGD carries from one step to the next, by bucket index.
MEMORIES = ("error_dict", "p_memory_dict", "q_memory_dict")
COUNTERS = ("iter", "total_numel_before_compression", "total_numel_after_compression", "next_stats_report")


def powersgd_state(state: PowerSGDState) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, JSON-safe description) of a PowerSGD state, for a safetensors file."""
    tensors = {f"powersgd.{kind}.{bucket}": t.detach().cpu().contiguous().clone()
               for kind in MEMORIES for bucket, t in getattr(state, kind).items()}
    kind, keys, pos, has_gauss, cached = state.rng.get_state()
    tensors["powersgd.rng_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {name: int(getattr(state, name)) for name in COUNTERS}
    meta["rng"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return tensors, meta


def restore_powersgd(state: PowerSGDState, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any],
                     device: torch.device) -> None:
    """Put back what ``powersgd_state`` saved (same world size: the same buckets on this rank)."""
    for kind in MEMORIES:
        prefix = f"powersgd.{kind}."
        memory = {int(name[len(prefix):]): t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        getattr(state, kind).clear()
        getattr(state, kind).update(memory)
    for name in COUNTERS:
        setattr(state, name, int(meta[name]))
    rng = meta["rng"]
    state.rng.set_state((rng["kind"], tensors["powersgd.rng_keys"].numpy().astype(np.uint32), rng["pos"],
                         rng["has_gauss"], rng["cached_gaussian"]))
