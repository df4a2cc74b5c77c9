"""Ray Train: distrain's Trainer inside each worker of ``ray.train.torch.TorchTrainer``.

Ray starts the workers, creates their process group (gloo for CPU workers, NCCL for GPU ones; see Ray's
``ray/train/torch/config.py``) and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in each. The Trainer
reuses that group (``dist.init_process_group`` leaves an existing group alone and does not destroy it) and takes
Ray's device. Every committed checkpoint is reported to Ray (``ray.train.report``, rank 0 handing over the
checkpoint directory, which Ray copies into its storage); after a worker-group restart (``FailureConfig``'s
``max_failures``) the new workers resume from ``ray.train.get_checkpoint()``, on exactly the next sample.

    from distrain.integrations.ray import fit
    result = fit("configs/quickstart.yaml", num_workers=2, storage_path="/shared/ray", max_failures=3)

or ``distrain ray configs/quickstart.yaml --workers 2``. Ray itself is an optional dependency:
``pip install 'distrain[ray]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from distrain.config import ConfigSource, load_config, to_container
from distrain.errors import UsageError

TrainerKwargs = Callable[[], Dict[str, Any]]  # returns Trainer keyword arguments: model, train_data, loss_fn, ...


def _import_ray():
    try:
        import ray  # lazy: optional: Ray is optional (distrain[ray])
        import ray.train
        import ray.train.torch
    except ImportError:
        raise UsageError("Ray Train is not installed: pip install 'distrain[ray]' (it brings ray[train]; "
                         "install it with the same torch constraints as distrain).") from None
    return ray


class _ReportingCheckpointer:
    """The Trainer's checkpointer, plus one ``ray.train.report`` per committed checkpoint on every rank (Ray
    requires all workers to report equally often; only rank 0 hands over the directory, which on the shared run
    directory already holds every rank's shard)."""

    def __init__(self, inner: Any, rank: int):
        self._inner = inner
        self._rank = rank
        self._reported: Optional[Path] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def maybe_save(self, step: int) -> Optional[Path]:
        path = self._inner.maybe_save(step)
        if path is not None:
            self._inner.wait()  # an async save is committed before Ray copies it
            self._report(step, path)
        return path

    def save(self, step: int, reason: str = "manual", blocking: bool = True) -> Path:
        path = self._inner.save(step, reason=reason, blocking=blocking)
        if not blocking:
            self._inner.wait()
        self._report(step, path)
        return path

    def _report(self, step: int, path: Path) -> None:
        import ray.train  # lazy: optional: Ray is optional (distrain[ray])

        if path == self._reported:  # saving a step twice returns the same checkpoint: report it once
            return
        self._reported = path
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if self._rank == 0 else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=Path(path).name)


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """What each Ray worker runs: build the Trainer on Ray's process group and device, resume from Ray's latest
    checkpoint when there is one, train, and report the final metrics."""
    import ray.train  # lazy: optional: Ray is optional (distrain[ray])
    import ray.train.torch

    from distrain.training.trainer import Trainer  # lazy: start-up: pulls in torch, which this module does without

    overrides = list(loop_config.get("overrides", ()))
    # Ray registers a reported checkpoint asynchronously: a worker group that fails within moments of a report may
    # come back without it, and then train.resume=auto finds the same checkpoint in the (shared) run directory.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue from what Ray kept
        overrides.append(f"train.resume={checkpoint.to_directory()}" if _remote(checkpoint)
                         else f"train.resume={checkpoint.path}")
    factory: Optional[TrainerKwargs] = loop_config.get("trainer_kwargs")
    kwargs = factory() if factory else {}
    with Trainer(loop_config["config"], overrides=overrides, device=ray.train.torch.get_device(),
                 **kwargs) as trainer:
        trainer.checkpointer = _ReportingCheckpointer(trainer.checkpointer, trainer.info.rank)
        trainer.log.info(f"Ray Train: world rank {trainer.info.rank} of {trainer.info.world_size} on {trainer.device}; "
                         + (f"resumed from Ray's checkpoint {checkpoint.path}" if checkpoint else
                            f"no checkpoint from Ray, so train.resume={trainer.cfg.train.resume} decides"))
        final = trainer.fit()
    ray.train.report({k: v for k, v in final.items() if isinstance(v, (int, float))})


def _remote(checkpoint: Any) -> bool:
    """Whether Ray keeps the checkpoint somewhere other than this machine's file system (then download it)."""
    import pyarrow.fs  # lazy: optional: pyarrow comes with Ray, optional (distrain[ray])

    return not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)


def fit(config: ConfigSource, overrides: Sequence[str] = (), *, num_workers: int = 2, use_gpu: bool = False,
        resources_per_worker: Optional[Dict[str, float]] = None, storage_path: Optional[str] = None,
        max_failures: int = 0, trainer_kwargs: Optional[TrainerKwargs] = None, name: Optional[str] = None) -> Any:
    """Train ``config`` with ``num_workers`` Ray Train workers; returns Ray's ``Result``.

    Connects to the Ray cluster ``ray.init`` finds (RAY_ADDRESS, or a new local one). ``storage_path`` is where
    Ray keeps the reported checkpoints (default <run.dir>/ray); ``max_failures`` worker-group restarts are allowed,
    each resuming from the newest reported checkpoint. ``trainer_kwargs``: a function (run on each worker) that
    returns your own ``model``, ``train_data``, ``loss_fn``, ``eval_data`` for ``distrain.Trainer``.
    """
    ray = _import_ray()
    # lazy: optional: Ray is optional (distrain[ray])
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise UsageError(f"num_workers={num_workers} is not allowed: it must be at least 1.")
    from distrain.preflight import check_job  # lazy: start-up: pulls in torch, which this module does without

    cfg = load_config(config, overrides)
    check_job(cfg, num_workers)  # fail here, once, before any worker starts
    # Workers do not share the driver's working directory: every path they use must be absolute.
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    storage = str(Path(storage_path).resolve()) if storage_path else str(Path(cfg.run.dir) / "ray")
    if not ray.is_initialized():
        ray.init(**_local_cluster_args(num_workers, resources_per_worker))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_container(cfg), "trainer_kwargs": trainer_kwargs},
        torch_config=TorchConfig(timeout_s=int(cfg.dist.timeout_s)),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=name or cfg.run.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
    )
    return trainer.fit()


def _local_cluster_args(num_workers: int, resources_per_worker: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """ray.init arguments: join RAY_ADDRESS's cluster, or start a local one with room for every worker."""
    if os.environ.get("RAY_ADDRESS"):
        return {}
    per_worker = float((resources_per_worker or {}).get("CPU", 1))
    return {"num_cpus": max(os.cpu_count() or 1, int(num_workers * per_worker + 0.999)),
            "include_dashboard": False}
