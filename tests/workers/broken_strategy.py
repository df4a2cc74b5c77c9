"""A deliberately broken strategy for the test that `distrain verify` catches it: DDP that never syncs."""

import contextlib

from distrain.strategies.ddp import DDPStrategy


class NoSyncDDP(DDPStrategy):
    name = "broken-no-sync"

    def accumulate(self, last_micro_step: bool):
        # Skips gradient averaging on every micro-step: ranks drift apart. (At world size 1 DDPStrategy does not
        # wrap the model at all, so there is nothing to skip.)
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync else contextlib.nullcontext()
