"""Start a benchmark job: N ranks of ``benchmarks.worker`` under torchrun, and read back rank 0's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from benchmarks.workload import REPO


class JobFailed(RuntimeError):
    """A benchmark job exited non-zero; the message carries the tail of its output."""


def job_env(threads_per_rank: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A clean environment: no inherited launcher variables, a fixed thread count per rank, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = str(threads_per_rank)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def run_job(suite: str, params: Dict[str, Any], nproc: int, threads_per_rank: int, timeout_s: float = 900
            ) -> Dict[str, Any]:
    """Run ``suite``'s worker on ``nproc`` ranks; returns what rank 0 wrote (raises JobFailed otherwise)."""
    with tempfile.TemporaryDirectory(prefix="distrain-bench-job-") as tmp:
        params_path, out_path = Path(tmp) / "params.json", Path(tmp) / "out.json"
        params_path.write_text(json.dumps(params))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--module", "benchmarks.worker", suite, str(params_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                                  env=job_env(threads_per_rank))
        except subprocess.TimeoutExpired:
            raise JobFailed(f"{suite} job with {nproc} ranks did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not out_path.exists():
            raise JobFailed(f"{suite} job with {nproc} ranks failed (exit {proc.returncode}):\n"
                            f"{_worker_traceback(proc.stderr + proc.stdout)}")
        return json.loads(out_path.read_text())


def _worker_traceback(output: str, lines: int = 20) -> str:
    """The first failing rank's own traceback (torchrun prefixes it with [rankN]:), else the output's tail."""
    tagged = [line for line in output.splitlines() if line.startswith("[rank")]
    if tagged:
        first = tagged[0].split("]", 1)[0] + "]"
        return "\n".join(line for line in tagged if line.startswith(first))[-4000:]
    return "\n".join(output.strip().splitlines()[-lines:])
