"""The run directory's own record: run.json (status, world, plan, versions, final metrics) and config.yaml."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict

from distrain.version import __version__


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
    import torch  # lazy: start-up: torch takes seconds to import

    return {"distrain": __version__, "torch": torch.__version__}


class RunRecord:
    """Rank 0's status file for the run; `distrain runs ls` and humans read it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.json"
        self.data: Dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def update(self, **fields: Any) -> None:
        """Write the record with ``fields`` changed: a temporary file, then one atomic rename.

        When the disk refuses the temporary file (full, quota), it is removed and run.json is rewritten in place,
        compactly, in the blocks it already holds, so a run that fails on a full disk does not stay "running".
        """
        self.data.update(fields)
        self.data["updated"] = time.time()
        tmp = self.path.with_suffix(".json.tmp")
        # Strict JSON (a diverged loss is null, never NaN): every JSON reader can parse run.json.
        text = json.dumps(json_safe(self.data), indent=2, default=str, allow_nan=False)
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        except OSError:  # a full disk: no temporary file left behind, and the record still says what happened
            tmp.unlink(missing_ok=True)
            if not self.path.exists():
                raise
            with open(self.path, "r+") as f:
                f.write(json.dumps(json_safe(self.data), separators=(",", ":"), default=str, allow_nan=False))
                f.truncate()

    def start(self, world_size: int, plan: Dict[str, int], start_step: int) -> None:
        self.update(status="running", world_size=world_size, plan=plan, start_step=start_step, host=socket.gethostname(),
                    started=time.time(), pid=os.getpid(), versions=versions())
