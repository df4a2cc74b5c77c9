"""Issue 19's benchmark: what ``train.micro_batch: auto`` costs once settled, against the same micro-batch fixed.

gpt (configs/gpt.yaml), 2 ranks, ddp, global batch 32 = micro 8 x accum 2 x 2 ranks. Both contestants are
distrain Trainers built in the same processes, taking turns step by step in shuffled rounds: one with
``train.micro_batch=8``, one with ``train.micro_batch=auto`` and ``micro_batch_max=8`` (settled at 8 from the
start: on a CPU nothing runs out of memory, and a settled run executes the same code as one that searched). What
auto adds per step: one number appended to the last gradient bucket's all-reduce (no collective of its own: the
collectives of one profiled step of each are counted and reported), a copy of the CPU random state and a Python
call per parameter per backward. Target: ratio of medians <= 1.01. The step time varies by a fifth from step to
step on a shared 2-core machine, so the default is 400 rounds (about a minute), enough for a 95% interval of a
few percent. ``python -m benchmarks auto_micro``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from benchmarks import stats
from benchmarks.comm_count import collectives
from benchmarks.contestants import DistrainContestant, build_on_all_ranks
from benchmarks.jobs import run_job
from benchmarks.options import Options, Section, check
from benchmarks.rounds import interleaved_rounds
from benchmarks.workload import Workload, make_workload
from distrain.env import ProcessInfo

NAME = "auto_micro"
TITLE = "train.micro_batch=auto once settled vs the same micro-batch fixed"
TARGET = 1.01
MICRO = 8
CONTESTANTS = {"fixed": {"micro_batch": MICRO}, "auto": {"micro_batch": "auto", "micro_batch_max": MICRO}}


class MicroBatchContestant(DistrainContestant):
    """A ddp Trainer on the workload with train.* keys set (the micro-batch mode)."""

    def __init__(self, work: Workload, train: Dict[str, Any]):
        from distrain.training.trainer import Trainer  # lazy: the driver process never trains

        cfg = work.config_for("ddp", {})
        for key, value in train.items():
            cfg.train[key] = value
        self.trainer = Trainer(cfg, train_data=work.train_data, eval_data=None)


def run(opts: Options) -> Dict[str, Any]:
    params = opts.job_params(config="configs/gpt.yaml", overrides=[f"train.micro_batch={MICRO}"],
                             rounds=opts.timed_rounds(full=400, smoke=3), warmup=opts.pick(full=5, smoke=1))
    return run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    notes: List[str] = []
    contestants = {}
    for label, train in CONTESTANTS.items():
        built = build_on_all_ranks(label, lambda train=train: MicroBatchContestant(work, train), notes)
        if built is not None:
            contestants[label] = built
    timings = interleaved_rounds({k: c.step for k, c in contestants.items()}, params["rounds"], params["warmup"],
                                 device)
    plans = {k: c.trainer.plan.micro_batch for k, c in contestants.items()}
    step = params["warmup"] + params["rounds"]  # one more step of each, profiled: its collectives (all ranks alike)
    counts = {k: [x.kind for x in collectives(lambda c=c: c.step(step))] for k, c in contestants.items()}
    for c in contestants.values():
        c.close()
    auto, fixed = timings.wall["auto"], timings.wall["fixed"]
    return {"workload": work.describe(), "notes": notes, "rounds": params["rounds"], "micro_batch": plans, "collectives": counts,
            "auto": stats.summary(auto), "fixed": stats.summary(fixed), "ratio": stats.ratio_of_medians(auto, fixed),
            "times_auto": auto, "times_fixed": fixed}


def report(result: Dict[str, Any], ctx: Any) -> Section:
    r = result["ratio"]
    c = check(NAME, "gpt, 2 ranks: auto / fixed", r["ratio"], "<=", TARGET)
    lines = [f"gpt, {result['workload']['world_size']} ranks, micro_batch {result['micro_batch']}, "
             f"{result['rounds']} timed rounds\n",
             "| contestant | median ms (IQR) |", "| --- | --- |",
             f"| fixed | {result['fixed']['median'] * 1e3:.2f} ({result['fixed']['iqr'] * 1e3:.2f}) |",
             f"| auto | {result['auto']['median'] * 1e3:.2f} ({result['auto']['iqr'] * 1e3:.2f}) |", "",
             f"collectives in a settled step: fixed {_described(result['collectives']['fixed'])}, auto "
             f"{_described(result['collectives']['auto'])}", "",
             f"ratio auto / fixed: {r['ratio']:.4f} (95% CI {r['ci_lo']:.4f}-{r['ci_hi']:.4f}); target <= {TARGET}: "
             f"{'met' if c.met else 'NOT met'}"] + [f"- {n}" for n in result["notes"]]
    return Section(TITLE, "\n".join(lines), [c], [])


def _described(kinds: List[str]) -> str:
    """e.g. "2 (all_reduce x 2)"."""
    return f"{len(kinds)} (" + ", ".join(f"{k} x {kinds.count(k)}" for k in sorted(set(kinds))) + ")"
