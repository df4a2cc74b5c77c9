"""Knowledge distillation: a small built-in gpt student learns from a trained gpt teacher, on 2 ranks.

The student's step computes hard cross-entropy on the next characters plus the KL divergence to the teacher's
softened distribution (temperature T, scaled by T^2), both summed over the tokens and divided by the step's global
token count (``num_items_in_batch``), so the objective is the same at any micro_batch and world size. The teacher is
a *frozen* module: distrain puts it on every rank's device in eval mode under no_grad, outside DDP, the optimizer,
the checkpoints and the exports. The same student is then trained alone, for the same steps on the same samples,
and both are evaluated by the plain cross-entropy on the held-out tail of the corpus (the ``ce`` metric hook).

    torchrun --nproc-per-node 2 examples/distill.py                # train the teacher first (runs/distill-teacher)
    torchrun --nproc-per-node 2 examples/distill.py --teacher runs/distill-teacher   # reuse a trained teacher
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

import distrain

DATA = {"name": "text", "kwargs": {"block_size": 64, "max_chars": 1_000_000}, "eval_fraction": 0.05}
TEACHER = {"name": "gpt", "kwargs": {"embed": 128, "heads": 4, "layers": 4}}
STUDENT = {"name": "gpt", "kwargs": {"embed": 32, "heads": 2, "layers": 1}}


def config(name: str, model: Dict[str, Any], steps: int, lr: float, runs: str) -> Dict[str, Any]:
    return {"run": {"name": name, "dir": runs}, "model": model, "data": DATA,
            "train": {"global_batch": 64, "micro_batch": 32, "steps": steps, "optimizer": "adamw", "lr": lr,
                      "lr_schedule": "cosine", "warmup_steps": max(1, steps // 20), "grad_clip": 1.0,
                      "log_every": max(1, steps // 5), "resume": "never"},
            "checkpoint": {"at_end": name.endswith("teacher")}, "strategy": {"name": "ddp"},
            "metrics": {"progress": "plain"}}


def distill_step(model, batch, teacher, num_items_in_batch, temperature: float = 2.0, alpha: float = 0.5):
    """(1 - alpha) x hard cross-entropy + alpha x T^2 x KL(teacher_T || student_T), summed over tokens / N."""
    inputs, targets = batch
    logits = model(inputs).float()
    soft_targets = F.log_softmax(teacher(inputs).float() / temperature, dim=-1)
    valid = targets != -100
    hard = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft_targets, log_target=True, reduction="none")
    soft = (kl.sum(-1) * valid).sum() * temperature ** 2
    return {"loss": ((1 - alpha) * hard + alpha * soft) / num_items_in_batch, "logits": logits}


def cross_entropy(outputs, batch):
    """Eval metric hook: the student's plain next-character cross-entropy as (sum, count), for both students."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    targets = batch[1]
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum()


def train(cfg: Dict[str, Any], **kwargs: Any) -> Dict[str, Any]:
    with distrain.Trainer(cfg, metrics={"ce": cross_entropy}, **kwargs) as trainer:
        return trainer.fit()


def main(argv: Optional[list] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a trained built-in gpt (run dir, checkpoint or export); default: train one")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="student steps, with and without the teacher")
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args(argv)

    if "RANK" in os.environ and not torch.distributed.is_initialized():
        # Under torchrun: one process group for the three trainings (each Trainer reuses it; re-creating a group
        # in the same processes can race on torchrun's store).
        torch.distributed.init_process_group()
    teacher_path = args.teacher
    results: Dict[str, float] = {}
    if teacher_path is None:
        results["teacher_eval_ce"] = train(config("distill-teacher", TEACHER, args.teacher_steps, 3e-3,
                                                  args.runs))["eval_ce"]
        teacher_path = str(Path(args.runs) / "distill-teacher")
    teacher = distrain.load_model(teacher_path)  # CPU, eval mode; distrain moves it to each rank's device
    student_cfg = config("distill-student", STUDENT, args.steps, 3e-3, args.runs)
    results["student_with_teacher_eval_ce"] = train(student_cfg, step_fn=distill_step,
                                                    frozen={"teacher": teacher})["eval_ce"]
    alone_cfg = config("distill-student-alone", STUDENT, args.steps, 3e-3, args.runs)
    results["student_alone_eval_ce"] = train(alone_cfg)["eval_ce"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
