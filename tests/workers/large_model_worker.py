"""One rank of tests/test_large_models.py: peak resident memory of building a ~1.2 GB model, then two steps.

    torchrun --nproc-per-node 3 tests/workers/large_model_worker.py CASE OUT_DIR

Each case runs in fresh processes, since the peak (``ru_maxrss``) only ever grows. Every rank writes
``CASE.rank<R>.json``: its peak resident memory before and after ``Trainer(...)``, the full model's parameter
bytes, and the loss after the steps (none for a construction-only case).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from meta_models import large_user_model

GPT = ["model.name=gpt", "model.kwargs={embed: 1024, heads: 16, layers: 24}"]
CASES = {  # name -> (overrides, user factory?, train after building?)
    "fsdp-gpt": (GPT + ["strategy.name=fsdp"], False, True),
    "fsdp-user": (["strategy.name=fsdp"], True, True),
    # DeepSpeed's default buckets are sized for GPUs (reduce_bucket_size 5e8 elements = 2 GB of fp32 per rank):
    # smaller ones keep three CPU ranks within this machine's memory.
    "deepspeed3-gpt": (GPT + ["strategy.name=deepspeed", "strategy.kwargs.stage=3",
                              "strategy.kwargs.config={zero_optimization: {reduce_bucket_size: 5000000, "
                              "stage3_prefetch_bucket_size: 5000000, stage3_max_live_parameters: 20000000, "
                              "stage3_max_reuse_distance: 20000000, sub_group_size: 20000000}}"], False, True),
    "fsdp-gpt-eager": (GPT + ["strategy.name=fsdp", "model.init=eager"], False, False),
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(case: str, out: Path) -> None:
    from distrain.data import build_datasets
    from distrain.training.trainer import Trainer

    overrides, user, train_after = CASES[case]
    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    train, _ = build_datasets("text", {"max_chars": 20000, "block_size": 16}, 0.1)
    common = ["train.global_batch=3", "train.micro_batch=1", "train.steps=2", "train.log_every=1",
              "train.eval_every=0", "metrics.progress=none", "checkpoint.at_end=false", f"run.dir={out / 'runs'}",
              f"run.name={case}", "train.resume=never", "faults.watchdog=false"]
    factory = large_user_model if user else None
    built = _peak_before_deepspeed_initialize()
    torch_dist.barrier()
    before = peak_rss_bytes()
    trainer = Trainer("configs/gpt.yaml", overrides=common + overrides, model=factory, train_data=train,
                      eval_data=None)
    after = peak_rss_bytes()
    torch_dist.barrier()
    with torch.device("meta"):  # the full model's parameter bytes, counted without allocating it
        shapes = factory() if user else trainer_model_on_meta(trainer)
    full = sum(p.numel() * p.element_size() for p in shapes.parameters())
    loss = trainer.fit()["loss"] if train_after else None
    trainer.close()
    (out / f"{case}.rank{rank}.json").write_text(json.dumps({
        "before": before, "after": after, "growth": after - before, "param_bytes": full, "loss": loss,
        "growth_until_deepspeed_initialize": built[0] - before if built else None,
        "model_init": trainer.model_init, "peak_after_steps": peak_rss_bytes()}))


def _peak_before_deepspeed_initialize() -> list:
    """Note the peak just before deepspeed.initialize (which allocates ZeRO's optimizer state up front), to tell
    the model's own build from DeepSpeed's optimizer in a deepspeed case."""
    from distrain.strategies.deepspeed_engine import import_deepspeed

    deepspeed = import_deepspeed()
    seen: list = []
    initialize = deepspeed.initialize

    def noting(*args, **kwargs):
        seen.append(peak_rss_bytes())
        return initialize(*args, **kwargs)

    deepspeed.initialize = noting
    return seen


def trainer_model_on_meta(trainer) -> torch.nn.Module:
    from distrain.models import build_model

    return build_model(trainer.cfg.model.name, trainer.cfg.model.kwargs, trainer.train_data.spec)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
