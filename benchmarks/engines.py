"""distrain's deepspeed and accelerate strategies against the same training hand-written with each engine.

    python -m benchmarks.engines [--nproc 2] [--stages 0,1,2,3] [--rounds 30] [--config configs/gpt.yaml] [k=v ...]

One torchrun job (gloo on CPUs, NCCL on GPUs): every contestant - distrain's Trainer with strategy deepspeed
(each ZeRO stage) or accelerate, and the hand-written DeepSpeed / Accelerate loops below - is built in the same
processes on the same workload (model, data, global and micro batch, optimizer), and they take turns step by
step in rounds, in a fresh random order each round. Printed: median step time of each, the ratio
median(distrain) / median(hand-written) with a bootstrap interval (target <= 1.02), and the same ratio of the
CPU time rank 0 spends in each step (robust to other processes on a shared machine).

The hand-written loops are also the references of the step-time suite (benchmarks/contestants.py imports
``raw_deepspeed`` and ``raw_accelerate``). They are what the engines' own documentation shows: DeepSpeed's
``engine.backward(loss); engine.step()`` on every micro-batch, Accelerate's ``with accelerator.accumulate(model)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List


from benchmarks.workload import REPO, Workload
from distrain.optim import lr_at

TARGET = 1.02


class RawDeepSpeed:
    """A DeepSpeed training loop as DeepSpeed's tutorials write it, on the workload's model and optimizer."""

    def __init__(self, work: Workload, stage: int = 0):
        from distrain.strategies.deepspeed_engine import import_deepspeed  # sets DS_ACCELERATOR=cpu without CUDA

        deepspeed = import_deepspeed()
        self.work, train, plan = work, work.cfg.train, work.plan
        model = work.build_model().to(work.device)
        zero: Dict[str, Any] = {"stage": stage}
        if stage == 3:
            zero["stage3_param_persistence_threshold"] = 0  # shard every parameter, as distrain's strategy does
        config = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
                  "gradient_accumulation_steps": plan.grad_accum, "gradient_clipping": float(train.grad_clip),
                  "bf16": {"enabled": train.precision == "bf16"}, "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=work.optimizer(model),
                                                    config=config, dist_init_required=False)

    def step(self, step: int) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(step, self.work.train)  # plain values, as RawLoop
        for inputs, targets in self.work.micro_batches(step):
            loss = self.work.loss_fn(self.engine(inputs), targets)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed updates on the accumulation boundary only

    def close(self) -> None:
        self.engine.destroy()


class RawAccelerate:
    """An Accelerate training loop as Accelerate's gradient-accumulation guide writes it."""

    def __init__(self, work: Workload):
        from accelerate import Accelerator

        self.work, train = work, work.cfg.train
        self.accelerator = Accelerator(gradient_accumulation_steps=work.plan.grad_accum, cpu=work.device.type == "cpu",
                                       mixed_precision={"fp32": "no"}.get(train.precision, train.precision))
        model = work.build_model().to(self.accelerator.device)
        self.model, self.optimizer = self.accelerator.prepare(model, work.optimizer(model))

    def step(self, step: int) -> None:
        train = self.work.train  # plain values, as RawLoop: a DictConfig read per step would slow this side
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        for inputs, targets in self.work.micro_batches(step):
            with self.accelerator.accumulate(self.model):
                loss = self.work.loss_fn(self.model(inputs), targets)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and train.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), train.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.accelerator.free_memory()


def raw_deepspeed(work: Workload, stage: int = 0) -> RawDeepSpeed:
    """The hand-written DeepSpeed reference (a factory for benchmarks/contestants.py)."""
    return RawDeepSpeed(work, stage)


def raw_accelerate(work: Workload) -> RawAccelerate:
    """The hand-written Accelerate reference (a factory for benchmarks/contestants.py)."""
    return RawAccelerate(work)


# --- the job ------------------------------------------------------------------------------------------------
def shuffled_rounds(contestants: Dict[str, Any], rounds: int, warmup: int, device: Any) -> Dict[str, List[float]]:
    """Like benchmarks.rounds.interleaved_rounds, but each round runs the contestants in a fresh random order.

    With ten contestants a rotated order always puts the same one before each (distrain's stage 0 always after
    the Accelerate loop), and what the previous contestant leaves behind (caches, a DDP reducer's threads) then
    biases a pair by several percent. A seeded shuffle, identical on every rank, spreads that evenly.
    """
    from benchmarks.rounds import settle, timed_step

    names = list(contestants)
    for k in range(warmup):
        for name in names:
            contestants[name](k)
    settle(device)
    order_rng = random.Random(0)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[:]
        order_rng.shuffle(order)
        for name in order:
            times[name].append(timed_step(contestants[name], warmup + r, device))
    return times


def worker(params: Dict[str, Any]) -> Dict[str, Any]:
    """One rank: build every contestant, time them in interleaved rounds; rank 0 returns the summary."""
    from benchmarks import stats
    from benchmarks.contestants import DistrainContestant, build_on_all_ranks
    from benchmarks.workload import make_workload
    from distrain import dist
    from distrain.env import detect

    info = detect()
    device = dist.resolve_device("auto", info)
    dist.init_process_group(info, dist.resolve_backend("auto", device), device, timeout_s=600)
    scratch = dist.broadcast_object(tempfile.mkdtemp(prefix="distrain-engines-") if info.rank == 0 else None)
    work = make_workload(params["config"], params["overrides"], info, device, scratch)
    notes: List[str] = []
    pairs = {f"deepspeed stage {s}": (("deepspeed", {"stage": s}), lambda s=s: RawDeepSpeed(work, s))
             for s in params["stages"]}
    pairs["accelerate"] = (("accelerate", {}), lambda: RawAccelerate(work))
    contestants: Dict[str, Any] = {}
    for label, ((strategy, kwargs), raw) in pairs.items():
        built = build_on_all_ranks(label, lambda: (DistrainContestant(work, strategy, kwargs), raw()), notes)
        if built is not None:
            contestants[f"{label}|distrain"], contestants[f"{label}|raw"] = built
    # Besides the job's wall time per step, this rank's CPU time per step: on a shared machine other processes
    # stretch wall times at random, while the CPU a contestant itself burns is what distrain could add.
    cpu: Dict[str, List[float]] = {name: [] for name in contestants}

    def cpu_timed(name: str, step_fn: Any) -> Any:
        def run(step: int) -> None:
            start = time.process_time()
            step_fn(step)
            cpu[name].append(time.process_time() - start)
        return run

    times = shuffled_rounds({name: cpu_timed(name, c.step) for name, c in contestants.items()}, params["rounds"],
                            params["warmup"], device)
    cpu = {name: values[params["warmup"]:] for name, values in cpu.items()}
    for contestant in contestants.values():
        contestant.close()
    dist.destroy_process_group()
    if info.rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = {}
    for label in pairs:
        if f"{label}|distrain" not in times:
            continue
        ours, theirs = times[f"{label}|distrain"], times[f"{label}|raw"]
        rows[label] = {"distrain_median_s": stats.summary(ours)["median"], "raw_median_s": stats.summary(theirs)["median"],
                       **stats.ratio_of_medians(ours, theirs),
                       "cpu_ratio": stats.ratio_of_medians(cpu[f"{label}|distrain"], cpu[f"{label}|raw"])["ratio"]}
    return {"workload": work.describe(), "rounds": params["rounds"], "rows": rows, "notes": notes}


def report(result: Dict[str, Any]) -> str:
    w = result["workload"]
    lines = [f"workload: {w['model']} ({w['params']:,} params), global batch {w['global_batch']} = micro "
             f"{w['micro_batch']} x accum {w['grad_accum']} x world {w['world_size']}, {w['optimizer']}, "
             f"{w['precision']}; {result['rounds']} rounds, each in a fresh random order",
             f"{'engine':<20} {'distrain (ms)':>14} {'hand-written (ms)':>18} {'ratio':>7} {'95% CI':>16} "
             f"{'CPU ratio':>10}  target <= {TARGET}"]
    for label, r in result["rows"].items():
        verdict = "ok" if r["ratio"] <= TARGET else "ABOVE TARGET"
        interval = "[{:.3f}, {:.3f}]".format(r["ci_lo"], r["ci_hi"])
        lines.append(f"{label:<20} {r['distrain_median_s'] * 1e3:>14.2f} {r['raw_median_s'] * 1e3:>18.2f} "
                     f"{r['ratio']:>7.3f} {interval:>16} {r['cpu_ratio']:>10.3f}  {verdict}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--stages", default="0,1,2,3", help="DeepSpeed ZeRO stages to race (default 0,1,2,3)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--config", default="configs/gpt.yaml", help="workload config (default configs/gpt.yaml)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="OMP threads per rank (default 1)")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch=8")
    args = parser.parse_args(argv)
    overrides = ["data.kwargs.max_chars=200000", "train.micro_batch=8", *args.overrides]  # accumulation 2 at W=2
    params = {"config": args.config, "overrides": overrides, "stages": [int(s) for s in args.stages.split(",") if s],
              "rounds": args.rounds, "warmup": args.warmup}
    from benchmarks.jobs import job_env

    with tempfile.TemporaryDirectory(prefix="distrain-engines-job-") as tmp:
        params_path, out_path = Path(tmp) / "params.json", Path(tmp) / "out.json"
        params_path.write_text(json.dumps(params))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "--module", "benchmarks.engines", "--worker", str(params_path), str(out_path)]
        proc = subprocess.run(cmd, cwd=REPO, env=job_env(args.threads_per_rank), capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            from benchmarks.jobs import _worker_traceback

            print(f"the engines job failed (exit {proc.returncode}):\n{_worker_traceback(proc.stderr + proc.stdout)}",
                  file=sys.stderr)
            return 1
        result = json.loads(out_path.read_text())
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _worker_main(params_path: str, out_path: str) -> int:
    result = worker(json.loads(Path(params_path).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1:]))
