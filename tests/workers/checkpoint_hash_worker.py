"""torchrun worker for test_checkpoint_hashing.py: who hashes which checkpoint files, and decisions all ranks share.

    torchrun --nproc-per-node 2 tests/workers/checkpoint_hash_worker.py OUT_DIR

Each rank records every file ``sha256_file`` reads, writes ``OUT_DIR/hashes-rank<r>.json`` after
  1. a synchronous save (checkpoint.every), 2. an async save, 3. a resume (train.resume=auto verifies the newest),
then ``OUT_DIR/agree-rank<r>.json`` after
  4. a step whose loss is nan on rank 1 only (train.on_nonfinite=skip_step: every rank must skip it),
  5. a run directory whose lock a live process holds (every rank must be refused, none left waiting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    import torch.distributed as torch_dist
    import torch.nn.functional as F

    from distrain import dist
    from distrain.checkpoint import manifest
    from distrain.errors import ConfigError
    from distrain.training.trainer import Trainer

    hashed = []
    original = manifest.sha256_file

    def recording(path):
        hashed.append(str(path))
        return original(path)
    manifest.sha256_file = recording

    torch_dist.init_process_group("gloo")  # every Trainer below reuses it
    rank = torch_dist.get_rank()
    config = str(Path(__file__).resolve().parents[2] / "configs" / "mlp.yaml")
    common = [f"run.dir={out}", "metrics.progress=none", "train.eval_every=0", "data.eval_fraction=0",
              "train.optimizer=adamw", "train.lr=0.003"]

    def phase(run_dir: Path) -> list:
        seen = sorted({Path(p).relative_to(run_dir).as_posix().split("/", 2)[2] for p in hashed
                       if Path(p).is_relative_to(run_dir)})  # checkpoints/step_X/<rel> -> <rel>
        hashed.clear()
        return seen

    result = {}
    with Trainer(config, overrides=[*common, "run.name=sync", "train.steps=2", "checkpoint.every=2"]) as trainer:
        trainer.fit()
    result["sync save"] = phase(out / "sync")
    with Trainer(config, overrides=[*common, "run.name=async", "train.steps=2", "checkpoint.every=2",
                                    "checkpoint.async_save=true"]) as trainer:
        trainer.fit()
    result["async save"] = phase(out / "async")
    with Trainer(config, overrides=[*common, "run.name=sync", "train.steps=2"]) as trainer:
        result["resumed step"] = trainer.step
    result["resume"] = phase(out / "sync")
    (out / f"hashes-rank{rank}.json").write_text(json.dumps(result))

    calls = {"n": 0}

    def nan_on_rank1_step2(output, target):
        calls["n"] += 1
        loss = F.cross_entropy(output, target)
        return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss
    agree = {}
    with Trainer(config, loss_fn=nan_on_rank1_step2,
                 overrides=[*common, "run.name=skip", "train.steps=4", "train.on_nonfinite=skip_step"]) as trainer:
        trainer.fit()
        weights = torch.cat([v.flatten() for v in trainer.full_state_dict().values()])
        agree["skipped"] = trainer.divergence.nonfinite_steps
        agree["finite"] = bool(torch.isfinite(weights).all())
        agree["weights_sum"] = float(weights.double().sum())
    try:
        Trainer(config, overrides=[*common, "run.name=locked", "train.steps=2"])
        agree["refused"] = None
    except ConfigError as err:
        agree["refused"] = str(err)
    (out / f"agree-rank{rank}.json").write_text(json.dumps(agree))
    # as the Trainer leaves a group it owns: a barrier, then a GIL-free pause before the teardown (see there)
    dist.leave_process_group(wait_for_peers=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
