"""A deliberately broken strategy for the test that `distrain verify` catches it: DDP that never syncs."""


from distrain.strategies.ddp import DDPStrategy


class NoSyncDDP(DDPStrategy):
    name = "broken-no-sync"

    def accumulate(self, last_micro_step: bool):
        return self.model.no_sync()  # skips gradient averaging on every micro-step: ranks drift apart


