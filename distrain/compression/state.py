"""The one object the loop and the checkpointer talk to: ``Compression``.

The trainer calls ``before_update()`` before every optimizer step (QAT's float64 gradient sum, where the strategy
allows it) and ``on_step(step)`` after it (masks back on, a mask update when the schedule says, QAT on from
train.qat_start); the checkpointer calls ``write`` on every rank at a save and ``load`` at a resume.
Each rank writes ``compression/rank<r>.safetensors``: its PowerSGD state (tensors) and, in the metadata, the pruning
state (the sparsity reached, the pruned tensors' names and zero counts), which every rank holds alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distrain.compression.checks import prune_end, sums_qat_grads_in_float64
from distrain.compression.float64_grads import Float64GradSum
from distrain.strategies.param_views import param_views
from distrain.compression.pruning import Pruner, is_update_step, ramp
from distrain.compression.qat import set_fake_quant
from distrain.compression.selection import selected_weights
from distrain.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # annotations only: strategies/ keep PowerSGD's state here, so this folder never imports them
    from distrain.strategies.base import Strategy

COMPRESSION_DIR = "compression"
FORMAT = "distrain-compression/1"


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / COMPRESSION_DIR / f"rank{rank}.safetensors"


def read_rank_file(directory: Path, rank: int) -> Optional[tuple]:
    """(tensors, description) a rank saved into checkpoint ``directory``, or None when it saved none."""
    path = rank_file(directory, rank)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["distrain"])
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read as distrain's compression state: {err}.") from None


class Compression:
    """Pruning masks, QAT's switch and the comm hook's state of one run (each part off unless configured)."""

    def __init__(self, train: DictConfig, strategy: Strategy):
        self.train = train
        self.strategy = strategy
        # plain values: on_step runs after every step, and a DictConfig read costs microseconds (loop_cost)
        self.qat_start: Optional[int] = int(train.qat_start) if train.qat != "none" else None
        p = train.prune
        self.pruner: Optional[Pruner] = None
        if p.amount > 0:
            weights = selected_weights(strategy.module, list(p.include), list(p.exclude))
            if not weights:
                raise ConfigError(f"train.prune.amount={p.amount}, but no weight is selected for pruning: the model "
                                  f"has no nn.Linear / nn.Conv layer left after train.prune.exclude="
                                  f"{list(p.exclude)}. Name weights with train.prune.include, or set "
                                  f"train.prune.amount=0.", key="train.prune.amount")
            views = param_views([param for _, param in weights], deepspeed=strategy.name == "deepspeed")
            self.pruner = Pruner([name for name, _ in weights], views, str(p.scope))
        self.end = prune_end(train)
        self.grad_sum: Optional[Float64GradSum] = None
        kwargs = {"comm_hook": getattr(strategy, "comm_hook", None),
                  "static_graph": getattr(strategy, "ddp_kwargs", {}).get("static_graph", False)}
        if train.qat != "none" and sums_qat_grads_in_float64(strategy.name, kwargs, strategy.ctx.plan.auto):
            # from step 0, not qat_start: a last-bit difference before QAT starts would meet the grid later
            self.grad_sum = Float64GradSum(strategy.module.parameters())
            strategy.engine_reduces_grads = False
        self.on_step(0)  # train.prune.start=0 prunes the initial weights; QAT off until train.qat_start

    def before_update(self) -> None:
        """After the step's last backward: QAT's float64 gradient sum over ranks into ``p.grad`` (when on)."""
        if self.grad_sum is not None:
            self.strategy.count_sent(self.grad_sum.finish())  # the strategy's comm_bytes count it

    def on_step(self, step: int) -> None:
        """After ``step`` optimizer steps: pruned weights back to zero, new masks when due, QAT on from qat_start."""
        if self.pruner is not None:
            p = self.train.prune
            self.pruner.apply()  # the update just moved pruned weights: they are zero again before anything reads them
            if is_update_step(step, int(p.start), self.end, int(p.every)):
                self.pruner.update(ramp(step, float(p.amount), int(p.start), self.end))
        self._qat_switch(step)

    def _qat_switch(self, step: int) -> None:
        """QAT's fake quantizers on from train.qat_start (after ``step`` steps), off before."""
        if self.qat_start is not None:
            set_fake_quant(self.strategy.module, step >= self.qat_start)

    # --- checkpoint -------------------------------------------------------------------------------
    def write(self, directory: Path, rank: int) -> None:
        """Every rank: this rank's compression state into checkpoint ``directory`` (collective when sharded)."""
        tensors: Dict[str, torch.Tensor] = {}
        meta: Dict[str, Any] = {"format": FORMAT}
        if self.pruner is not None:
            meta["prune"] = {"amount": self.pruner.amount, "zeros": self.pruner.zero_counts(),
                             "sizes": self.pruner.sizes()}
        hook_state = getattr(self.strategy, "comm_hook_state", None)
        if hook_state is not None:
            tensors, meta["powersgd"] = hook_state.state_tensors()
        if len(meta) == 1:
            return
        path = rank_file(directory, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"distrain": json.dumps(meta)})

    def load(self, directory: Path, rank: int, saved_world_size: int, world_size: int, step: int) -> List[str]:
        """Every rank, after the strategy loaded the weights: masks, QAT switch and PowerSGD state back; returns
        notes for the resume line."""
        notes: List[str] = []
        mine = read_rank_file(directory, rank) if saved_world_size == world_size else None
        shared = mine or read_rank_file(directory, 0)
        saved = shared[1] if shared else {}
        if self.pruner is not None:
            notes += self._restore_masks(saved.get("prune"), str(directory))
        self._qat_switch(step)
        hook_state = getattr(self.strategy, "comm_hook_state", None)
        if hook_state is not None:
            if mine is not None and "powersgd" in mine[1]:
                hook_state.load_state_tensors(mine[0], mine[1]["powersgd"])
            else:
                notes.append(f"PowerSGD state reset (saved at world size {saved_world_size}, now {world_size}: each "
                             f"rank's error feedback belongs to its old share of the gradients); its warm-up runs "
                             f"again" if saved_world_size != world_size else
                             "PowerSGD state reset: the checkpoint holds none; its warm-up runs again")
        return notes

    def _restore_masks(self, saved: Optional[Dict[str, Any]], where: str) -> List[str]:
        assert self.pruner is not None
        amount = float(saved["amount"]) if saved else 0.0
        self.pruner.rebuild(amount)
        if not saved:
            return [f"pruning starts afresh: {where} holds no pruning state"]
        found = self.pruner.zero_counts()
        differ = sorted(name for name in found if found[name] != saved["zeros"].get(name))
        if differ:
            raise CheckpointError(f"The pruning masks rebuilt from the weights of {where} do not match the zero counts "
                                  f"saved with them (in {', '.join(differ[:5])}): the checkpoint was written with "
                                  f"other train.prune settings, or altered.")
        return [f"pruning masks restored ({100 * amount:.1f}% of the selected weights)"]
