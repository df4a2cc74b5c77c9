"""One rank of a data-loading test launch: train several data configs one after another in one process group.

Like tests/workers/strategy_worker.py, but the runs differ in their data (built-in, token shards, images, Hugging Face)
and in data.num_workers. For each run this writes the final full weights, the final train and eval loss, and
every (step, sample index) the rank's DataLoader fetched (recorded inside the fetching process, worker or not).

    torchrun --nproc-per-node W tests/workers/data_worker.py OUT_DIR RUNS_JSON
RUNS_JSON: [{"name": ..., "config": path, "overrides": [...], "worlds": [1, 2, 3]}, ...]; a run with
"continues": NAME shares NAME's run directory (at NAME's first world size) and resumes from its latest checkpoint,
at this launch's world size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as torch_dist


def main(out_dir: Path, runs: list) -> None:
    from safetensors.torch import save_file

    from distrain import dist
    from distrain.config import load_config
    from distrain.data import build_datasets
    from distrain.training.trainer import Trainer
    from distrain.verify.worker import RecordingDataset

    torch_dist.init_process_group("gloo")  # every Trainer below reuses it
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    for run in runs:
        if world not in run.get("worlds", [world]):
            continue
        run_dir = out_dir / run["name"] / f"w{world}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if "continues" in run:  # the continued run's directory, whatever world size wrote it
            first = next(r for r in runs if r["name"] == run["continues"])
            run_name = f"{first['name']}-w{first['worlds'][0]}"
        else:
            run_name = f"{run['name']}-w{world}"
        overrides = list(run["overrides"]) + [f"run.dir={out_dir / 'runs'}", f"run.name={run_name}",
                                              f"train.resume={'auto' if 'continues' in run else 'never'}",
                                              "metrics.progress=none"]
        cfg = load_config(run["config"], overrides)
        train, evaluation = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)
        recording = RecordingDataset(train, run_dir / f"seen.rank{rank}.txt")
        with Trainer(cfg, train_data=recording, eval_data=evaluation) as trainer:
            final = trainer.fit()
            weights = trainer.full_state_dict()
            if rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(run_dir / "weights.safetensors"))
                (run_dir / "result.json").write_text(json.dumps({
                    "loss": final["loss"], "eval_loss": final.get("eval_loss"), "grad_accum": trainer.plan.grad_accum,
                    "world_size": world, "num_workers": trainer.loader_options.num_workers, "steps": trainer.step}))
        dist.barrier()
    # as the Trainer leaves a group it owns: a barrier, then a GIL-free pause before the teardown (see there)
    dist.leave_process_group(wait_for_peers=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
