"""The worker's side of torchrun's error reporting: the error file the elastic agent reads to name the failed rank."""

from __future__ import annotations

import os

def record_error_file(err: BaseException) -> None:
    """Write torchelastic's error file for this worker, so `torchrun`/`distrain launch` report the real cause.

    A no-op outside torchrun (no TORCHELASTIC_ERROR_FILE). Called by the CLI for errors it turns into exit codes.
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    # lazy: start-up: torch takes seconds to import
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)
