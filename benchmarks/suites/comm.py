"""Suite 2, communication efficiency of distrain's DDP gradient sync (gpt example, 2 ranks).

Measured in one job, all variants interleaved in rounds:
- bytes all-reduced per step, read from torch.profiler's record of the backend collectives;
- sync cost: the same step on a one-sample micro-batch with and without gradient sync (paired per round);
  its bus bandwidth against a raw ``all_reduce`` of the same bytes (minus an empty timed step: the barriers);
  target >= 85%;
- exposed communication: the full-batch step with sync minus the same step with sync suppressed, as a
  fraction of the step; target <= 25%;
- the effect of the bucket size and of the bf16 / fp16 / PowerSGD comm hooks on step time and bytes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from benchmarks import stats
from benchmarks.comm_count import collective_bytes, wire_bytes
from benchmarks.contestants import DistrainContestant, build_on_all_ranks
from benchmarks.instrument import step_without_grad_sync
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.rounds import interleaved_rounds
from benchmarks.workload import make_workload
from distrain.env import ProcessInfo

NAME = "comm"
TITLE = "2. Communication efficiency"
CONFIG = "configs/gpt.yaml"
BANDWIDTH_TARGET = 0.85
EXPOSED_TARGET = 0.25
BUCKETS_MB = [0.025, 0.1, 0.25, 25.0]  # the gpt example is ~0.47 MB of fp32 gradients: 1 to ~20 buckets
HOOKS = ["bf16", "fp16", "powersgd"]


def run(opts: Options) -> Dict[str, Any]:
    params = opts.job_params(config=CONFIG, overrides=[], rounds=opts.timed_rounds(full=120, smoke=3),
                             warmup=opts.pick(full=5, smoke=1), repeat=opts.pick(full=10, smoke=2),
                             buckets=[25.0, 0.1] if opts.smoke else BUCKETS_MB, hooks=HOOKS)
    return run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    # One sample per rank: the step's compute shrinks, its gradient sync stays the same size.
    tiny = make_workload(params["config"], [*params["overrides"], f"train.global_batch={info.world_size}",
                                            "train.micro_batch=1"], info, device, params["scratch"])
    notes: List[str] = []
    built: Dict[str, DistrainContestant] = {}
    variants = {f"bucket {mb:g} MB": {"bucket_cap_mb": mb} for mb in params["buckets"]}
    variants.update({f"hook {hook}": {"comm_hook": hook} for hook in params["hooks"]})
    for label, kwargs in variants.items():
        c = build_on_all_ranks(label, lambda: DistrainContestant(work, "ddp", kwargs), notes)
        if c is not None:
            built[label] = c
    default = built["bucket 25 MB"]
    tiny_ddp = DistrainContestant(tiny, "ddp", {})
    n_params = sum(p.numel() for p in default.trainer.strategy.module.parameters())
    flat = torch.zeros(n_params, device=device)  # the raw all_reduce of the same bytes as the gradients

    steps = {label: c.step for label, c in built.items()}
    steps["no sync"] = step_without_grad_sync(default.trainer)
    # The small quantities are timed k at a time: the sync/no-sync difference grows k-fold, the noise ~sqrt(k).
    k = params["repeat"]
    steps["tiny sync"] = repeated(tiny_ddp.step, k)
    steps["tiny no sync"] = repeated(step_without_grad_sync(tiny_ddp.trainer), k)
    steps["raw all_reduce"] = repeated(lambda s: dist.all_reduce(flat), k)
    steps["empty"] = lambda s: None
    times = interleaved_rounds(steps, params["rounds"], params["warmup"], device)
    for label in ("tiny sync", "tiny no sync", "raw all_reduce"):
        times[label] = [t / k for t in times[label]]

    last = params["warmup"] + params["rounds"]
    measured_bytes = {label: collective_bytes(lambda: c.step(last)) for label, c in built.items()}
    raw_bytes = collective_bytes(lambda: dist.all_reduce(flat))
    for c in [*built.values(), tiny_ddp]:
        c.close()

    sync_cost = stats.paired_difference(times["tiny sync"], times["tiny no sync"])
    raw_cost = stats.paired_difference(times["raw all_reduce"], [t / k for t in times["empty"]])
    grad_bytes = measured_bytes["bucket 25 MB"].get("all_reduce", 0)
    w = info.world_size
    bus = 2 * (w - 1) / w if w > 1 else 0.0
    variant_rows = []
    for label in built:
        exposed = stats.paired_difference(times[label], times["no sync"])
        step = stats.summary(times[label])
        variant_rows.append({"label": label, "step": step, "exposed": exposed,
                             "exposed_fraction": exposed["median"] / step["median"],
                             "bytes": measured_bytes[label], "wire_bytes": wire_bytes(measured_bytes[label], w)})
    return {
        "world_size": w, "params": n_params, "grad_bytes": grad_bytes, "raw_bytes": raw_bytes,
        "sync_cost": sync_cost, "raw_allreduce": raw_cost,
        "busbw_ours": bus * grad_bytes / sync_cost["median"] if sync_cost["median"] > 0 else float("nan"),
        "busbw_raw": bus * grad_bytes / raw_cost["median"] if raw_cost["median"] > 0 else float("nan"),
        "efficiency": raw_cost["median"] / sync_cost["median"] if sync_cost["median"] > 0 else float("nan"),
        "no_sync": stats.summary(times["no sync"]), "variants": variant_rows, "notes": notes,
        "rounds": params["rounds"], "workload": work.describe(),
    }


def repeated(step: Callable[[int], object], k: int) -> Callable[[int], None]:
    """One timed unit of ``k`` consecutive steps (global steps s*k .. s*k+k-1)."""
    def run(s: int) -> None:
        for i in range(k):
            step(s * k + i)
    return run


def report(result: Dict[str, Any], ctx: Any) -> Section:
    r = result
    w = r["workload"]
    mb = r["grad_bytes"] / 2**20
    checks: List[Check] = [
        check(NAME, "gradient sync bus bandwidth / raw all_reduce", r["efficiency"], ">=", BANDWIDTH_TARGET),
    ]
    default = next(v for v in r["variants"] if v["label"] == "bucket 25 MB")
    checks.append(check(NAME, "exposed communication / step (gpt, default buckets)", default["exposed_fraction"],
                        "<=", EXPOSED_TARGET))
    lines = [
        f"gpt example, {w['params']:,} parameters, {r['world_size']} ranks, {r['rounds']} rounds. "
        f"Bytes all-reduced per step (profiler): **{r['grad_bytes']:,}** ({mb:.2f} MiB; fp32 gradients = "
        f"{4 * w['params']:,}).\n",
        "| measurement | median | IQR |", "| --- | --- | --- |",
        f"| gradient sync cost (1-sample step, sync - no sync) | {r['sync_cost']['median'] * 1e3:.3f} ms | "
        f"{r['sync_cost']['iqr'] * 1e3:.3f} ms |",
        f"| raw all_reduce of the same bytes (minus empty step) | {r['raw_allreduce']['median'] * 1e3:.3f} ms | "
        f"{r['raw_allreduce']['iqr'] * 1e3:.3f} ms |",
        f"| bus bandwidth: ours / raw | {r['busbw_ours'] / 1e6:.1f} / {r['busbw_raw'] / 1e6:.1f} MB/s | |",
        f"| efficiency (target >= {BANDWIDTH_TARGET:.0%}) | **{r['efficiency']:.1%}** | |", "",
        "Bucket size and comm hooks (full gpt batch; exposed = step with sync - same step without sync):\n",
        "| variant | step median ms (IQR) | exposed comm ms | exposed / step | bytes all-reduced | bytes on the "
        "wire per rank |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in r["variants"]:
        sent = sum(v["bytes"].values())
        lines.append(f"| {v['label']} | {v['step']['median'] * 1e3:.2f} ({v['step']['iqr'] * 1e3:.2f}) | "
                     f"{v['exposed']['median'] * 1e3:.2f} | {v['exposed_fraction']:.1%} | {sent:,} | "
                     f"{v['wire_bytes']:,.0f} |")
    lines.append(f"| no sync (compute only) | {r['no_sync']['median'] * 1e3:.2f} ({r['no_sync']['iqr'] * 1e3:.2f})"
                 f" | - | - | 0 | 0 |")
    lines += [f"\n- {n}" for n in r["notes"]]
    plots = [p for p in [ctx.plot_comm(result)] if p]
    return Section(TITLE, "\n".join(lines), checks, plots)
