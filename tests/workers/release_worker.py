"""One rank of tests/test_trainer.py's release check: what a failing Trainer.__init__ and FaultTolerance.close
leave behind in a real 2-rank job. Prints one JSON line per rank: {"rank", "checks": {name: value}}.

    torchrun --nproc-per-node 2 tests/workers/release_worker.py CONFIG RUN_DIR

The job's process group is made here, once (re-making a default group in one process is not reliable), so the
Trainer reuses it; what is counted is every other group: the async-save group, the stop agreement's group.
"""

from __future__ import annotations

import json
import logging
import sys

import torch.distributed as torch_dist


def process_groups() -> int:
    return len(torch_dist.distributed_c10d._world.pg_map)  # private, but the one place that lists every group


def main(config: str, run_dir: str) -> None:
    from distrain import dist
    from distrain.config import load_config
    from distrain.env import detect
    from distrain.errors import CheckpointError
    from distrain.faults import FaultTolerance
    from distrain.training.trainer import Trainer

    torch_dist.init_process_group("gloo")
    checks = {}
    before = process_groups()
    # A refused resume, after the log file, the strategy and the async-save group exist.
    try:
        Trainer(config, overrides=[f"run.dir={run_dir}", "run.name=refused", "train.resume=/nonexistent",
                                   "checkpoint.async_save=true", "metrics.progress=none"])
    except CheckpointError:
        checks["init_refused"] = True
    checks["groups_left_by_failed_init"] = process_groups() - before
    checks["log_handlers_left"] = len(logging.getLogger("distrain").handlers)  # no pytest here: all are ours

    # The stop agreement's gloo group of an NCCL run (backend "nccl" here only decides that the group is made).
    torch_dist.barrier()  # both ranks are done tearing down the last group before the next one connects
    faults = FaultTolerance(load_config(config, ["faults.watchdog=false"]).faults, detect())
    faults.start(logging.getLogger("distrain"), 30, backend="nccl")
    checks["faults_groups_made"] = process_groups() - before
    faults.close()
    checks["faults_groups_left"] = process_groups() - before
    dist.leave_process_group(wait_for_peers=False)  # a GIL-free pause, then the teardown (see there)
    # one write of one line (under PIPE_BUF): the two ranks share the pipe, and print() writes the newline apart
    sys.stdout.write(json.dumps({"rank": detect().rank, "checks": checks}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
