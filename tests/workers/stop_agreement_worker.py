"""torchrun worker for test_faults.py: the lagged, spaced stop agreement (``distrain.faults.stop_agreement``) on 2
gloo ranks, with real signals.

    torchrun --nproc-per-node 2 tests/workers/stop_agreement_worker.py OUT_DIR

1. slow steps: three step boundaries; before the second, rank 1 is a slow step behind (it sleeps ``BEHIND_S``,
   a step longer than the agreement's spacing) and then receives a real SIGUSR1;
2. quick steps (``QUICK_S``): rank 1 receives SIGUSR1 after step ``SIGNAL_AT``; every rank runs until it is told
   to stop.
Each rank writes ``OUT_DIR/agree-rank<r>.json``: phase 1's codes and seconds per call, phase 2's stop step and the
agreements it started, and whether an agreement was left in flight after each phase.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch.distributed as torch_dist

from distrain.faults.preemption import NO_STOP, PreemptionHandler
from distrain.faults.stop_agreement import StopAgreement

BEHIND_S, QUICK_S, SIGNAL_AT, MAX_STEPS = 5.0, 0.005, 100, 2000


def slow_steps(rank: int) -> Dict[str, Any]:
    handler, agreement = PreemptionHandler(["USR1"], []), StopAgreement()
    assert handler.install()
    codes, seconds = [], []
    for completed in (1, 2, 3):
        if rank == 1 and completed == 2:
            time.sleep(BEHIND_S)  # a step slower than rank 0's
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled, in that step
        started = time.perf_counter()
        codes.append(agreement.collect(completed, handler.local_code()))
        seconds.append(time.perf_counter() - started)
    handler.uninstall()
    agreement.drop_finished()
    return {"codes": codes, "seconds": seconds, "in_flight": agreement.in_flight}


def quick_steps(rank: int) -> Dict[str, Any]:
    handler, agreement = PreemptionHandler(["USR1"], []), StopAgreement()
    assert handler.install()
    started, previous, completed = 0, None, 0
    while completed < MAX_STEPS:
        time.sleep(QUICK_S)  # a step
        completed += 1
        if rank == 1 and completed == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGUSR1)
        if agreement.collect(completed, handler.local_code()) != NO_STOP:
            break
        started += agreement._pending is not previous  # a new agreement was started after this step
        previous = agreement._pending
    handler.uninstall()
    agreement.drop_finished()
    return {"stopped": completed, "started": started, "in_flight": agreement.in_flight}


def main(out: Path) -> None:
    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    result = {"slow": slow_steps(rank), "quick": quick_steps(rank)}
    (out / f"agree-rank{rank}.json").write_text(json.dumps(result))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
