"""Bytes that really went through collectives, read from torch.profiler's record of gloo/NCCL calls.

The profiler records every backend collective (``gloo:all_reduce``, ``nccl:all_gather``, ...) with its
tensor shapes and dtypes, so what a strategy sends is measured, not assumed from its design.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List

from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

# Element sizes of the dtype names the profiler reports.
DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "int": 4, "long int": 8,
               "long": 8, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}
BACKENDS = ("gloo:", "nccl:")


@dataclass
class Collective:
    kind: str  # all_reduce, all_gather, broadcast, ...
    nbytes: int  # the input this rank contributed (all_reduce buffer, all_gather shard, reduce_scatter input)
    start_ns: int
    duration_s: float  # as the backend ran it (including any wait for a late peer)


def collectives(run: Callable[[], object]) -> List[Collective]:
    """Run ``run()`` under the profiler; returns the backend collectives it issued, in start order.

    Barriers carry no payload and are dropped. Profiling only the steps themselves keeps setup chatter out.
    """
    # All threads: comm hooks issue collectives from future callbacks on the backend's threads (PowerSGD).
    config = _ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, experimental_config=config) as prof:
        run()
    out = []
    for event in prof.profiler.kineto_results.events():
        name = event.name()
        if not name.startswith(BACKENDS):
            continue
        kind = name.split(":", 1)[1]
        shapes, dtypes = event.shapes(), event.dtypes()
        if kind == "barrier" or not shapes or not dtypes:
            continue
        nbytes = math.prod(shapes[0]) * DTYPE_BYTES.get(dtypes[0], 4)
        out.append(Collective(kind, nbytes, event.start_ns(), event.duration_ns() / 1e9))
    return sorted(out, key=lambda c: c.start_ns)


def collective_bytes(run: Callable[[], object]) -> Dict[str, int]:
    """Input bytes per collective kind that ``run()`` issued (e.g. {"all_reduce": 465408})."""
    totals: Dict[str, int] = defaultdict(int)
    for c in collectives(run):
        totals[c.kind] += c.nbytes
    return dict(totals)


def wire_bytes(per_kind: Dict[str, int], world_size: int) -> float:
    """Bytes each rank sends (ring algorithms) for the per-kind input bytes that ``collective_bytes`` counted.

    all_reduce: 2(W-1)/W x n. all_gather: the input is this rank's shard, it receives the W-1 others, (W-1) x n.
    reduce_scatter (input: the full tensor) and broadcast (every rank passes the same size, receives all but its
    own share over the W broadcasts of a partitioned update): (W-1)/W x n.
    """
    if world_size < 2:
        return 0.0
    w = world_size
    total = 0.0
    for kind, nbytes in per_kind.items():
        if kind == "all_reduce":
            total += 2 * (w - 1) / w * nbytes
        elif kind in ("all_gather", "allgather", "all_gather_into_tensor", "_allgather_base"):
            total += (w - 1) * nbytes
        elif kind in ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base"):
            total += (w - 1) / w * nbytes
        elif kind == "broadcast":
            total += (w - 1) / w * nbytes
        else:
            total += nbytes
    return total
