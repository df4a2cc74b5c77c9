"""One rank of tests/test_meta_init.py's world-size-3 launch: every strategy's initial weights, before any step.

    torchrun --nproc-per-node 3 tests/workers/meta_init_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as torch_dist

from meta_models import user_model

CASES = {
    "fsdp": ["strategy.name=fsdp"],
    "deepspeed-3": ["strategy.name=deepspeed", "strategy.kwargs.stage=3"],
    "fsdp-user": ["strategy.name=fsdp"],
}


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from distrain import dist
    from distrain.data import build_datasets
    from distrain.training.trainer import Trainer

    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    train, _ = build_datasets("text", {"max_chars": 20000, "block_size": 32}, 0.1)
    results = {}
    for name, overrides in CASES.items():
        common = ["run.seed=11", "train.global_batch=6", "train.micro_batch=2", "train.steps=1",
                  "metrics.progress=none",
                  f"run.dir={out / 'runs'}", f"run.name={name}", "model.init=meta", "model.name=gpt",
                  "model.kwargs={embed: 48, heads: 4, layers: 3}"]
        model = user_model if name.endswith("user") else None
        with Trainer("configs/gpt.yaml", overrides=common + overrides, model=model, train_data=train,
                     eval_data=None) as trainer:
            weights = trainer.full_state_dict()
            if rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{name}.safetensors"))
                results[name] = {"meta": trainer.model_init == "meta",
                                 "flops_per_sample": trainer.throughput.flops.per_sample}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    # as the Trainer leaves a group it owns: a barrier, then a GIL-free pause before the teardown (see there)
    dist.leave_process_group(wait_for_peers=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
