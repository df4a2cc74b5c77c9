"""A Trainer ends with its script: ``with``, ``close()``, or neither (as Hugging Face Trainer users write it).

A script that never calls ``close()`` leaves DataLoader workers (which ignore SIGTERM, see
``distrain.data.workers``), threads and the process group behind. At interpreter exit ``multiprocessing``'s own
exit handler would SIGTERM its daemonic children and join them - forever. ``close_at_exit`` registers, per Trainer,
an ``atexit`` handler that closes it first: atexit runs handlers newest first, and ``multiprocessing`` (imported
with torch, before any Trainer exists) registered its own earlier. The close is the failure path's (no barrier
with the peers, which may be gone or never reach one), so the exit cannot hang on another rank.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any, Callable


def close_at_exit(trainer: Any) -> Callable[[], None]:
    """Close ``trainer`` (``trainer.close(failed=True)``) at interpreter exit unless it was closed before; the
    handler holds only a weak reference, so a Trainer the script dropped is not kept alive (closing twice is
    harmless, so the handler stays registered). Returns the handler."""
    ref = weakref.ref(trainer)

    def close() -> None:
        live = ref()
        if live is None:
            return
        try:
            live.close(failed=True)
        except Exception as err:  # noqa: BLE001 - the interpreter is exiting; say why the release failed, go on
            logging.getLogger("distrain").warning(f"closing the Trainer at exit failed: {type(err).__name__}: {err}")

    atexit.register(close)
    return close

