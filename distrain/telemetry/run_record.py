"""The run directory's own record: run.json (status, world, plan, versions, final metrics) and config.yaml."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict

from distrain import __version__


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nan, inf) replaced by None, at any depth: strict JSON can hold it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def versions() -> Dict[str, str]:
    import torch

    return {"distrain": __version__, "torch": torch.__version__}


class RunRecord:
    """Rank 0's status file for the run; `distrain runs ls` and humans read it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.json"
        self.data: Dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated"] = time.time()
        tmp = self.path.with_suffix(".json.tmp")
        # Strict JSON (a diverged loss is null, never NaN): every JSON reader can parse run.json.
        tmp.write_text(json.dumps(json_safe(self.data), indent=2, default=str, allow_nan=False))
        os.replace(tmp, self.path)  # atomic: a reader never sees half a file

    def start(self, world_size: int, plan: Dict[str, int], start_step: int) -> None:
        self.update(status="running", world_size=world_size, plan=plan, start_step=start_step, host=socket.gethostname(),
                    started=time.time(), pid=os.getpid(), versions=versions())
