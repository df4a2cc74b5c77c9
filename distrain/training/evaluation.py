"""Evaluation over a whole data set: each rank forwards a contiguous share, and the sums are reduced over ranks.

The eval loss is the training objective over the whole set (summed item losses / items, see
distrain.training.objective.Objective.eval_sums), accuracy comes with class logits, and every ``metrics`` hook
reports eval_<name> = sum / count.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from distrain import dist
from distrain.data import EVAL_STEP, EvalLoader, LoaderOptions
from distrain.data.fetching import BatchKey
from distrain.env import ProcessInfo
from distrain.training.objective import Objective


def eval_batches(n: int, rank: int, world_size: int, batch_size: int) -> List[tuple]:
    """Rank ``rank``'s contiguous share of an eval set of ``n`` samples as (indices, weight) batches of at most
    ``batch_size``, padded with weight-0 batches so every rank runs as many forwards (FSDP gathers in them)."""
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    batches = [(mine[i:i + batch_size], 1) for i in range(0, len(mine), batch_size)]
    needed = math.ceil(per_rank / batch_size)
    return batches + [([0], 0)] * (needed - len(batches))


def reduce_scores(totals: Dict[str, float], metrics: Sequence[str], device: torch.device) -> Dict[str, float]:
    """Collective: this rank's eval sums (``Objective.eval_sums``, added over its batches) summed over all ranks,
    as scores: eval_loss, eval_accuracy (when anything was predicted) and eval_<name> per metric."""
    keys = ["loss", "items", "correct", "predicted"] + [f"{kind}:{name}" for name in metrics
                                                        for kind in ("metric", "count")]
    reduced = dist.all_reduce_sum(torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64,
                                               device=device)).cpu().tolist()
    summed = dict(zip(keys, reduced))
    scores = {"eval_loss": summed["loss"] / max(summed["items"], 1)}
    if summed["predicted"] > 0:
        scores["eval_accuracy"] = summed["correct"] / summed["predicted"]
    for name in metrics:
        scores[f"eval_{name}"] = summed[f"metric:{name}"] / max(summed[f"count:{name}"], 1)
    return scores


class Evaluator:
    """Evaluates the strategy's model on the eval split (its loader kept, with its persistent workers) or on any
    other data set (a one-off loader), with the same DataLoader settings as training."""

    def __init__(self, objective: Objective, strategy: Any, eval_data: Optional[Dataset], options: LoaderOptions,
                 info: ProcessInfo, *, seed: int, batch_size: int):
        self.objective, self.strategy, self.eval_data = objective, strategy, eval_data
        self.options, self.device, self.seed = options, strategy.ctx.device, seed
        self.rank, self.world_size, self.batch_size = info.rank, info.world_size, batch_size
        self._loader: Optional[EvalLoader] = None

    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None) -> Dict[str, float]:
        """Collective: the scores of the model on ``dataset`` (default: the eval split; none: {}), sharded over
        ranks and reduced."""
        dataset = dataset if dataset is not None else self.eval_data
        if dataset is None:
            return {}
        model = self.strategy.model
        was_training = model.training
        model.eval()
        totals: Dict[str, float] = {}
        loader = self._loader_for(dataset)
        for key, batch in loader:
            with self.strategy.forward_context():
                sums = self.objective.eval_sums(model, batch)
            if key.padding:  # padding so every rank runs the same number of forwards (FSDP gathers in them)
                continue
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
        if loader is not self._loader:  # a one-off dataset's workers go now
            loader.close()
        model.train(was_training)
        return reduce_scores(totals, list(self.objective.metrics), self.device)

    def _loader_for(self, dataset: Dataset) -> EvalLoader:
        if dataset is self.eval_data and self._loader is not None:
            return self._loader
        batches = eval_batches(len(dataset), self.rank, self.world_size, self.batch_size)
        keys = [BatchKey(EVAL_STEP, j, tuple(indices), padding=not weight) for j, (indices, weight) in enumerate(batches)]
        loader = EvalLoader(dataset, keys, self.options, self.device, seed=self.seed, rank=self.rank)
        if dataset is self.eval_data:
            self._loader = loader
        return loader

    def close(self) -> None:
        """The eval split's DataLoader workers go."""
        if self._loader is not None:
            self._loader.close()


__all__ = ["Evaluator", "eval_batches", "reduce_scores"]
