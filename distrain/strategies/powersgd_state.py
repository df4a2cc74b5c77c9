"""PowerSGD's state, kept across a resume: each rank's error feedback, warm-start factors, iteration and RNG.

torch's ``PowerSGDState`` lives inside the DDP comm hook and is rebuilt empty by a new process, which silently
restarts the warm-up and forgets the accumulated compression error. Here it is saved per rank in the checkpoint
(``compression/rank<r>.safetensors``) and put back at the same world size; at another world size the buckets hold
other shares of the gradients, so it is reset, and the resume says so.

PowerSGD keys its memories by DDP bucket, laid out as the bucket's gradients are. DDP lays its buckets out anew in
every process: by parameter order for the first step, then by the order gradients became ready. So the state is
saved per parameter (cut along the layout each bucket had when it was last reduced) and reassembled, on the first
reduction of each bucket after the resume, in the layout that bucket has then.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, _should_compress

MEMORIES = ("error_dict", "p_memory_dict", "q_memory_dict")  # PowerSGD's per-bucket memories, in this order
COUNTERS = ("iter", "total_numel_before_compression", "total_numel_after_compression", "next_stats_report")


class PowerSGDMemory:
    """A PowerSGD state, and each bucket's parameter layout as the comm hook last saw it."""

    def __init__(self, state: PowerSGDState, parameters: Iterable[nn.Parameter]):
        self.state = state
        self._position = {id(p): i for i, p in enumerate(parameters)}
        self.layouts: Dict[int, List[Tuple[int, Tuple[int, ...]]]] = {}  # bucket -> (parameter position, shape)
        self._pending: Dict[int, List[torch.Tensor]] = {}  # parameter position -> its saved memories, to place

    def before_hook(self, bucket: Any) -> None:
        """Called by the comm hook before PowerSGD reduces ``bucket``. When DDP has laid its buckets out anew (after
        the first step of every process), the memories made in the old layout are cut per parameter; a bucket whose
        parameters all have pieces waiting (re-bucketed, or resumed) gets its memories assembled in its layout."""
        layout = [(self._position[id(p)], tuple(p.shape)) for p in bucket.parameters()]
        if self.layouts and self.layouts.get(bucket.index()) != layout:
            self._pending.update(self._pieces())
            for kind in MEMORIES:
                getattr(self.state, kind).clear()
            self.layouts = {}
        self.layouts[bucket.index()] = layout
        if self._pending and all(pos in self._pending for pos, _ in layout):
            for k, kind in enumerate(MEMORIES):
                pieces = [self._pending[pos][k] for pos, _ in layout]
                if any(piece.numel() for piece in pieces):
                    getattr(self.state, kind)[bucket.index()] = torch.cat(pieces).to(bucket.buffer().device)
            for pos, _ in layout:
                del self._pending[pos]

    def _pieces(self) -> Dict[int, List[torch.Tensor]]:
        """Every bucket's memories cut per parameter (position -> [error, P, Q], empty where it has none), along
        the layout each bucket had when PowerSGD last reduced it."""
        pieces: Dict[int, List[torch.Tensor]] = {}
        for bucket, layout in self.layouts.items():
            for k, kind in enumerate(MEMORIES):
                memory = getattr(self.state, kind).get(bucket)
                if memory is None:
                    continue
                sizes = [self._sizes(shape)[k] for _, shape in layout]
                for (pos, _), piece in zip(layout, memory.detach().split(sizes)):
                    pieces.setdefault(pos, [torch.empty(0)] * len(MEMORIES))[k] = piece.clone()
        return pieces

    def _sizes(self, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
        """(error, P, Q) elements of one parameter in a bucket's memories, as powerSGD_hook lays them out."""
        numel = int(np.prod(shape)) if shape else 1
        n = shape[0] if shape else 1
        m = numel // n
        rank = min(n, m, self.state.matrix_approximation_rank)
        compressed = _should_compress(n, m, rank, self.state.min_compression_rate)[0]
        return numel, (n * rank if compressed else 0), (m * rank if compressed else 0)

    def state_tensors(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(tensors, JSON-safe description): the memories cut per parameter, counters and RNG."""
        tensors = {f"powersgd.{kind}.{pos}": piece.cpu().contiguous() for pos, pieces in self._pieces().items()
                   for kind, piece in zip(MEMORIES, pieces) if piece.numel()}
        kind, keys, pos, has_gauss, cached = self.state.rng.get_state()
        tensors["powersgd.rng_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        meta = {name: int(getattr(self.state, name)) for name in COUNTERS}
        meta["rng"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        return tensors, meta

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """Put back what ``state_tensors`` saved (same world size); the memories are placed bucket by bucket at
        their next reduction."""
        for kind in MEMORIES:
            getattr(self.state, kind).clear()
        self._pending = {}
        for name, tensor in tensors.items():
            parts = name.split(".")
            if len(parts) == 3 and parts[1] in MEMORIES:
                slots = self._pending.setdefault(int(parts[2]), [torch.empty(0)] * len(MEMORIES))
                slots[MEMORIES.index(parts[1])] = tensor
        for name in COUNTERS:
            setattr(self.state, name, int(meta[name]))
        rng = meta["rng"]
        self.state.rng.set_state((rng["kind"], tensors["powersgd.rng_keys"].numpy().astype(np.uint32), rng["pos"],
                                  rng["has_gauss"], rng["cached_gaussian"]))
