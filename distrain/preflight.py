"""Everything checkable about a job before any worker starts (launch, verify, config show, slurm submit, k8s).

It sits above config/ and the registries (strategies, datasets, models, trackers) so that neither imports the other: config
knows the schema, the registries know their builders, and this module asks both.
"""

from __future__ import annotations

from omegaconf import DictConfig

from typing import Sequence, Union

from distrain.config import BatchPlan
from distrain.config.validation import elastic_batch_plans


def check_job(cfg: DictConfig, world_size: Union[int, Sequence[int]]) -> BatchPlan:
    """Everything checkable before any worker starts (launch, verify, config show, slurm submit): the batch plan
    for ``world_size`` (for a sequence of them, an elastic job's: each must divide; the largest's plan is returned),
    that the named strategy, dataset, model and trackers exist (each registry's own
    lookup, so the message is the one a worker would give), that the strategy's kwargs fit each world size (fsdp's
    replicate must divide it), and that data.collate_fn imports."""
    sizes = [world_size] if isinstance(world_size, int) else list(world_size)
    plan = elastic_batch_plans(cfg, sizes)[-1]  # before the imports below pull in torch: batch mistakes fail in 0.3 s
    # lazy: start-up (torch, ~2 s): a batch that does not divide is refused before they load
    from distrain.data.collate import resolve_collate_fn
    from distrain.data.datasets import dataset_builder
    from distrain.models.registry import model_builder
    from distrain.strategies import strategy_class
    from distrain.telemetry.trackers import TRACKERS

    strategy = strategy_class(cfg.strategy.name)
    for size in sizes:  # e.g. fsdp's replicate must divide every world size an elastic job can have
        strategy.check_world(cfg.strategy.kwargs, size)
    dataset_builder(cfg.data.name)
    model_builder(cfg.model.name)
    for tracker in cfg.metrics.trackers:
        if tracker not in TRACKERS:
            TRACKERS.resolve(tracker)  # a user's own Tracker subclass: it imports here, not only on rank 0
    resolve_collate_fn(cfg.data.collate_fn)  # a path that does not import fails here, not on every rank
    return plan
