"""One process, no process group: the reference every other strategy must reproduce."""

from __future__ import annotations

from torch import nn

from distrain.strategies.base import Strategy


class SingleStrategy(Strategy):
    name = "single"
    needs_process_group = False
    meta_init = True
    supports_auto_micro_batch = True  # one rank: nothing to rejoin

    def setup(self, model: nn.Module) -> None:
        self.model = self._on_device(model)
        self._checkpoint_and_compile(self.model)
        self.optimizer = self._build_optimizer(self.model)
