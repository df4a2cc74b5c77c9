"""One rank of a benchmark job: ``python -m benchmarks.worker SUITE PARAMS.json OUT.json`` under torchrun.

Joins the job's process group once (every contestant's Trainer reuses it), runs the suite's ``worker``
function on every rank, and rank 0 writes the JSON result.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List


def main(argv: List[str]) -> int:
    from distrain import dist
    from distrain.env import detect

    suite, params_path, out_path = argv
    params = json.loads(Path(params_path).read_text())
    warnings.filterwarnings("ignore")  # engines' deprecation chatter would bury the result in the log
    info = detect()
    device = dist.resolve_device(params.get("device", "auto"), info)
    backend = dist.resolve_backend("auto", device)
    dist.init_process_group(info, backend, device, timeout_s=float(params.get("timeout_s", 600)))
    # The job's scratch directory (run dirs of the Trainers); rank 0 makes it and removes it at the end.
    scratch = dist.broadcast_object(tempfile.mkdtemp(prefix="distrain-bench-") if info.rank == 0 else None)
    params["scratch"] = scratch
    try:
        module = importlib.import_module(f"benchmarks.suites.{suite}")
        result = module.worker(params, info, device)
        if info.rank == 0:
            Path(out_path).write_text(json.dumps(result, indent=1, default=float))
    finally:
        dist.leave_process_group(wait_for_peers=True)  # a barrier, then a GIL-free pause (see there)
        if info.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
