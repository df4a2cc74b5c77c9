"""One rank of a multi-strategy test launch: train several configs one after another in one process group.

Starting torchrun and importing torch/DeepSpeed costs more than 30 small steps, so tests/test_strategies.py
launches each world size once and runs every strategy inside it. For each run this writes what
`distrain verify` writes (final full weights, final loss, the sample indices every rank consumed) plus every
rank's memory report and comm byte count.

    torchrun --nproc-per-node W tests/workers/strategy_worker.py OUT_DIR RUNS_JSON
RUNS_JSON: [{"name": ..., "config": path, "overrides": [...], "worlds": [1, 2, 3]}, ...]; a run with
"continues": NAME shares NAME's run directory and resumes from its latest checkpoint; one with "resume": PATH
resumes from that checkpoint (any run's); one with "model": "module:function" trains that factory's model (a module
on this script's path, e.g. meta_models:user_model); one with "dump_optim": true also writes the optimizer state it
holds once built (resumed), whole tensors keyed "<fqn>.<name>", to optim.safetensors.

A run that fails writes its error (``error.rank<R>.txt``) instead of its results and the next run starts: one
broken strategy fails its own tests, not every test of the module. The watchdog is off here: its abort notice
lives for the whole launch and would end the next run's ranks too.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
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
    datasets = {}
    for run in runs:
        if world not in run.get("worlds", [world]):
            continue
        run_dir = out_dir / run["name"] / f"w{world}"
        run_name = f"{run.get('continues', run['name'])}-w{world}"
        default_resume = "auto" if "continues" in run else "never"
        overrides = list(run["overrides"]) + [f"run.dir={out_dir / 'runs'}", f"run.name={run_name}",
                                              f"train.resume={run.get('resume', default_resume)}",
                                              "checkpoint.at_end=false", "metrics.progress=none",
                                              "faults.watchdog=false", "dist.timeout_s=120"]
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            cfg = load_config(run["config"], overrides)
            key = json.dumps([cfg.data.name, dict(cfg.data.kwargs)], sort_keys=True)
            if key not in datasets:
                datasets[key] = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)[0]
            recording = RecordingDataset(datasets[key])
            model = None
            if "model" in run:
                module, _, function = run["model"].partition(":")
                model = getattr(importlib.import_module(module), function)
            with Trainer(cfg, model=model, train_data=recording, eval_data=None) as trainer:
                recording.seen.clear()  # only what training consumes (a user's model is FLOP-counted on sample 0)
                if run.get("dump_optim"):
                    _dump_optimizer_state(trainer, run_dir / "optim.safetensors", rank)
                final = trainer.fit()
                weights = trainer.full_state_dict()
                memory = dist.all_gather_object(trainer.memory_report())
                comm = dist.all_gather_object(trainer.strategy.comm_bytes)
                (run_dir / f"indices.rank{rank}.json").write_text(json.dumps(recording.seen))
                if rank == 0:
                    # (a clone each: safetensors refuses tensors that share memory, as tied weights do)
                    save_file({k: v.contiguous().clone() for k, v in weights.items()},
                              str(run_dir / "weights.safetensors"))
                    (run_dir / "result.json").write_text(json.dumps({
                        "loss": final["loss"], "grad_accum": trainer.plan.grad_accum, "world_size": world,
                        "memory": memory, "comm_bytes": comm, "steps": trainer.step}))
        except Exception:  # noqa: BLE001 - reported by the run's own tests
            (run_dir / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        dist.barrier()
    # as the Trainer leaves a group it owns: a barrier, then a GIL-free pause before the teardown (see there)
    dist.leave_process_group(wait_for_peers=True)


def _dump_optimizer_state(trainer, path: Path, rank: int) -> None:
    """The optimizer state the strategy holds, whole, to ``path`` on rank 0 (a collective: every rank calls it).

    Read through ``Strategy.checkpoint_state``, the FQN-keyed view every DCP strategy saves: DTensor shards (fsdp)
    are gathered whole, and the entries each rank owns (zero1) are merged over ranks.
    """
    from safetensors.torch import save_file

    from distrain import dist

    state = trainer.strategy.checkpoint_state()["optim"]["state"]
    mine = {}
    for fqn in sorted(state):  # the same order on every rank: full_tensor() is a collective
        for key in sorted(state[fqn]):
            value = state[fqn][key]
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            mine[f"{fqn}.{key}"] = value.detach().cpu().clone()
    merged = {}
    for part in dist.all_gather_object(mine):
        merged.update(part)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(path))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
