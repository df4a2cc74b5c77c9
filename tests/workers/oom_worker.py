"""One rank of tests/test_oom.py's launch: every case of this world size in one process group.

    torchrun --nproc-per-node W tests/workers/oom_worker.py OUT_DIR CASES_JSON
CASES_JSON: [{"name", "strategy", "where", "limit", "overrides": [...]}, ...]. Each case trains twice: with
train.micro_batch=auto and OOM injected above ``limit`` on the last rank, and with micro_batch=limit fixed and no
injection; a case with "resume": [S, T] trains each mode to step S, then resumes it to T (global batch 24).
Writes each run's final weights and the samples of each step per rank; a run that ends in an error writes the
error's class and message instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as torch_dist
import torch.nn.functional as F

from distrain import dist
from distrain.errors import DistrainError
from distrain.training.trainer import Trainer
from oom_injection import IndexedData, OOMNet, mark_steps, steps_seen

PER_RANK = 8


def train(out: Path, name: str, overrides: list, net: OOMNet, steps: int = 3, global_batch: int = 0) -> dict:
    cfg = {"train": {"global_batch": global_batch or PER_RANK * torch_dist.get_world_size(), "steps": steps,
                     "optimizer": "adamw", "lr": 0.05, "log_every": 1, "resume": "auto"},
           "checkpoint": {"at_end": True}, "metrics": {"progress": "none"},
           "run": {"dir": str(out / "runs"), "name": name}}
    try:
        with Trainer(cfg, overrides=overrides, model=net, train_data=IndexedData(), loss_fn=F.mse_loss) as trainer:
            mark_steps(trainer, net)
            trainer.fit()
            weights = {k: v.tolist() for k, v in trainer.full_state_dict().items()}
            result = {"weights": weights, "micro_batch": trainer.micro_steps.plan.micro_batch}
    except DistrainError as err:
        return {"error": type(err).__name__, "message": str(err), "exit_code": err.exit_code}
    result["steps"] = dist.all_gather_object(steps_seen(net.records, PER_RANK))
    return result


def main(out: Path, cases: list) -> None:
    torch_dist.init_process_group("gloo")
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    for case in cases:
        result = resume_case(out, case, world) if case.get("resume") else matrix_case(out, case, world)
        (out / f"{case['name']}{f'.w{world}' if case.get('resume') else ''}.rank{rank}.json").write_text(
            json.dumps(result))
    # As the Trainer leaves a group it made: a barrier, then a GIL-free pause before the group goes. Destroying it
    # right after the last all-gather (as this worker's resume cases did) let a rank that finished first close its
    # gloo connections while a peer still read that all-gather's data: "Connection reset by peer" in gloo.
    dist.leave_process_group(wait_for_peers=True)


def resume_case(out: Path, case: dict, world: int) -> dict:
    """[S, T]: train to step S (and save), then on to T from the checkpoint: auto, then fixed."""
    runs = {}
    for mode, micro, where in (("auto", "auto", case["where"]), ("fixed", case["limit"], "none")):
        net, (steps, more) = OOMNet(case["limit"], where, world - 1, 24 // world), case["resume"]
        name, overrides = f"{case['name']}-{mode}", [f"train.micro_batch={micro}"]
        runs[f"{mode}_first"] = train(out, name, overrides, net, steps=steps, global_batch=24)
        runs[mode] = train(out, name, overrides, net, steps=more, global_batch=24)
    return runs


def matrix_case(out: Path, case: dict, world: int) -> dict:
    """micro_batch=auto with the OOM injected above ``limit`` on the last rank, and micro_batch=limit fixed."""
    limit, strategy = case["limit"], [f"strategy.name={case['strategy']}", *case.get("overrides", [])]
    dropout = case.get("dropout", 0.0)
    auto = train(out, f"{case['name']}-auto", ["train.micro_batch=auto", *strategy],
                 OOMNet(limit, case["where"], world - 1, PER_RANK, after=case.get("after", 0), dropout=dropout))
    fixed = train(out, f"{case['name']}-fixed", [f"train.micro_batch={limit}", *strategy],
                  OOMNet(limit, "none", world - 1, PER_RANK, dropout=dropout))
    return {"auto": auto, "fixed": fixed}


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
