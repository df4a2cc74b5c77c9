"""Fault injection for tests: a save that stalls on request, so a test can kill it in the middle.

``DISTRAIN_CHECKPOINT_STALL=STEP:SECONDS`` makes every rank sleep inside the save of checkpoint STEP, after the
trainer state is written and before the shards are. Unset (always, outside tests), it costs one environment read.
"""

from __future__ import annotations

import os
import time

STALL_ENV = "DISTRAIN_CHECKPOINT_STALL"


def stall_if_asked(step: int) -> None:
    spec = os.environ.get(STALL_ENV, "")
    if ":" in spec:
        at, _, seconds = spec.partition(":")
        if at.strip() == str(step):
            time.sleep(float(seconds))
