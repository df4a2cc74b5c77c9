"""One rank of tests/test_objective.py's launch: train every case of this world size in one process group.

    torchrun --nproc-per-node W tests/workers/objective_worker.py OUT_DIR RUNS_JSON
RUNS_JSON: [{"name", "kind": hf | gpt | distill, "overrides": [...], "worlds": [...], "continues": NAME?,
"probe": bool?}, ...]. For each run this writes what `distrain verify` writes (final full weights, final loss,
every rank's sample indices), plus eval scores and, with "probe", what the run did with its frozen teacher and
what its checkpoint and export hold.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as torch_dist

from objective_cases import PaddedTokens, distill_step, gpt2, parameter_ids, shifted_ce


def trainer_args(kind: str) -> Dict[str, Any]:
    if kind == "hf":
        return {"model": gpt2(), "train_data": PaddedTokens(), "eval_data": PaddedTokens(24, seed=1)}
    if kind == "distill":  # a 2-layer GPT-2 student, a frozen 3-layer GPT-2 teacher
        return {"model": gpt2(), "train_data": PaddedTokens(), "eval_data": PaddedTokens(24, seed=1),
                "step_fn": distill_step, "frozen": {"teacher": gpt2(layers=3, seed=1)},
                "metrics": {"ce": shifted_ce}}
    return {}  # built-in model and data from the config


def probe(trainer, teacher_before: Dict[str, torch.Tensor], out: Path) -> Dict[str, Any]:
    """What happened to the frozen teacher, and what the run's checkpoint and export hold (every rank calls)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from distrain.checkpoint.export import export_checkpoint

    teacher = trainer.objective.frozen["teacher"].module
    teacher_ids = set(parameter_ids(teacher))
    optimizer_ids = {id(p) for group in trainer.strategy.optimizer.param_groups for p in group["params"]}
    facts: Dict[str, Any] = {
        "teacher_class": type(teacher).__name__,
        "teacher_sharded": any(hasattr(p, "to_local") for p in teacher.parameters()),
        "teacher_in_optimizer": bool(teacher_ids & optimizer_ids),
        "teacher_training": teacher.training,
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_changed": any(not torch.equal(v.cpu(), teacher_before[k]) for k, v in teacher.state_dict().items()),
        "teacher_device": str(next(teacher.parameters()).device),
    }
    ckpt = trainer.save_checkpoint("probe")
    if torch_dist.get_rank() == 0:
        metadata = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
        facts["checkpoint_model_shapes"] = {k[len("model."):]: list(getattr(v, "size", [])) for k, v in metadata.items()
                                            if k.startswith("model.")}
        exported, _ = export_checkpoint(ckpt, out / "export.safetensors")
        facts["export_shapes"] = {k: list(v.shape) for k, v in load_file(str(exported)).items()}
    return facts


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
        if world not in run["worlds"]:
            continue
        started = time.perf_counter()
        run_dir = out_dir / run["name"] / f"w{world}"
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(run["overrides"]) + [
            f"run.dir={out_dir / 'runs'}", f"run.name={run.get('continues', run['name'])}-w{world}",
            f"train.resume={'auto' if 'continues' in run else 'never'}", "checkpoint.at_end=false",
            "metrics.progress=none"]
        cfg = load_config(None, overrides)
        args = trainer_args(run["kind"])
        if "train_data" not in args:
            args["train_data"], args["eval_data"] = build_datasets(cfg.data.name, cfg.data.kwargs, 0.1)
        recording = RecordingDataset(args.pop("train_data"))
        teacher_before = {k: v.clone() for k, v in args["frozen"]["teacher"].state_dict().items()} \
            if "frozen" in args else {}
        with Trainer(cfg, train_data=recording, **args) as trainer:
            recording.seen.clear()  # only what training consumed
            final = trainer.fit()
            weights = trainer.full_state_dict()
            (run_dir / f"indices.rank{rank}.json").write_text(json.dumps(recording.seen))
            facts = dist.all_gather_object(probe(trainer, teacher_before, run_dir)) if run.get("probe") else []
            if rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(run_dir / "weights.safetensors"))
                (run_dir / "result.json").write_text(json.dumps({
                    "loss": final["loss"], "grad_accum": trainer.plan.grad_accum, "world_size": world,
                    "steps": trainer.step, "eval": {k: v for k, v in final.items() if k.startswith("eval_")},
                    "probe": facts}))
        dist.barrier()
        if rank == 0 and os.environ.get("OBJECTIVE_WORKER_TIMES"):
            print(f"{run['name']} W={world}: {time.perf_counter() - started:.1f} s", flush=True)
    # as the Trainer leaves a group it owns: a barrier, then a GIL-free pause before the teardown (see there)
    dist.leave_process_group(wait_for_peers=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
