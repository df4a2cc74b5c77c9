"""Suite 2, communication efficiency of distrain's DDP gradient sync (gpt example, 2 ranks).

Measured in one job:
- exposed communication: each variant's step and the same step with gradient sync suppressed, interleaved in
  rounds; the paired difference is the communication backward could not hide, as a fraction of the step;
  target <= 25% (default buckets);
- bytes all-reduced per step and the time the all-reduces take, from torch.profiler's record of the backend
  collectives (per collective, the minimum duration over ranks: the last rank to arrive waits for nobody);
  bus bandwidth 2(N-1)/N x bytes / time against a raw ``all_reduce`` of the same bytes in one flat tensor at
  the end of the same step written without DDP, profiled the same way; target >= 85%;
- the effect of the bucket size (several all-reduces instead of one) and of the bf16 / fp16 / PowerSGD comm
  hooks (fewer bytes, plus compression work) on all of the above.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from benchmarks import stats
from benchmarks.comm_count import collectives, wire_bytes
from benchmarks.contestants import DistrainContestant, build_on_all_ranks
from benchmarks.instrument import step_without_grad_sync
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.raw_loops import RawDDP
from benchmarks.rounds import interleaved_rounds
from benchmarks.workload import make_workload
from distrain.dist import all_gather_object
from distrain.env import ProcessInfo

NAME = "comm"
TITLE = "2. Communication efficiency"
CONFIG = "configs/gpt.yaml"
BANDWIDTH_TARGET = 0.85
EXPOSED_TARGET = 0.25
BUCKETS_MB = [0.025, 0.1, 0.25, 25.0]  # the gpt example is ~0.47 MB of fp32 gradients: 1 to ~20 buckets
HOOKS = ["bf16", "fp16", "powersgd"]
RAW = "raw all_reduce"
TORCH_DDP = "torch DDP"
DEFAULT = "bucket 25 MB"  # DDP's default bucket size: the gpt example's gradients fit in one bucket


def run(opts: Options) -> Dict[str, Any]:
    params = opts.job_params(config=CONFIG, overrides=[], rounds=opts.timed_rounds(full=120, smoke=3),
                             warmup=opts.pick(full=5, smoke=1), profile_steps=opts.pick(full=15, smoke=2),
                             buckets=[25.0, 0.1] if opts.smoke else BUCKETS_MB, hooks=HOOKS)
    return run_job(NAME, params, opts.nproc, opts.threads_per_rank, opts.timeout_s)


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    notes: List[str] = []
    built: Dict[str, DistrainContestant] = {}
    variants = {f"bucket {mb:g} MB": {"bucket_cap_mb": mb} for mb in params["buckets"]}
    variants.update({f"hook {hook}": {"comm_hook": hook} for hook in params["hooks"]})
    for label, kwargs in variants.items():
        c = build_on_all_ranks(label, lambda: DistrainContestant(work, "ddp", kwargs), notes)
        if c is not None:
            built[label] = c
    default = built[DEFAULT]
    n_params = sum(p.numel() for p in default.trainer.strategy.module.parameters())
    raw = RawGradientSync(work)
    torch_ddp = RawDDP(work)  # torch's DDP with its built-in all-reduce: the engine's own in-backward sync

    # The compute-only reference is a model of its own, so no_sync never touches the measured DDP's state.
    reference = DistrainContestant(work, "ddp", {})
    steps = {label: c.step for label, c in built.items()}
    steps["no sync"] = step_without_grad_sync(reference.trainer)
    times = interleaved_rounds(steps, params["rounds"], params["warmup"], device).wall

    # Collective time, from the profiler: each rank's record of every all-reduce the step issued; the variants
    # and the raw sync take turns step by step here too.
    first = params["warmup"] + params["rounds"]
    profiled_steps = {**{label: c.step for label, c in built.items()}, RAW: raw.step, TORCH_DDP: torch_ddp.step}
    profiled = _profiled_rounds(profiled_steps, first, params["profile_steps"])
    for c in [*built.values(), reference]:
        c.close()

    w = info.world_size
    bus = 2 * (w - 1) / w if w > 1 else 0.0
    raw_s = stats.summary(profiled[RAW]["seconds"])
    raw_bytes = profiled[RAW]["bytes"].get("all_reduce", 0)
    rows = []
    for label in built:  # the raw sync is not a variant of ours
        exposed = stats.paired_difference(times[label], times["no sync"])
        step = stats.summary(times[label])
        sync = stats.summary(profiled[label]["seconds"])
        sent = profiled[label]["bytes"]
        rows.append({"label": label, "step": step, "exposed": exposed, "exposed_fraction": exposed["median"] / step["median"],
                     "bytes": sent, "wire_bytes": wire_bytes(sent, w), "collective_s": sync,
                     "collectives_per_step": profiled[label]["count"],
                     "busbw": bus * sent.get("all_reduce", 0) / sync["median"] if sync["median"] else float("nan")})
    ours = next(r for r in rows if r["label"] == DEFAULT)
    torch_s = stats.summary(profiled[TORCH_DDP]["seconds"])
    return {
        "torch_ddp_allreduce": torch_s,
        "world_size": w, "params": n_params, "grad_bytes": ours["bytes"].get("all_reduce", 0), "raw_allreduce": raw_s,
        "raw_bytes": raw_bytes, "busbw_raw": bus * raw_bytes / raw_s["median"] if raw_s["median"] else float("nan"),
        "efficiency": raw_s["median"] / ours["collective_s"]["median"] if ours["collective_s"]["median"] else float("nan"),
        "no_sync": stats.summary(times["no sync"]), "variants": rows, "notes": notes, "rounds": params["rounds"],
        "profile_steps": params["profile_steps"], "workload": work.describe(),
    }


class RawGradientSync:
    """The same step hand-written without DDP: forward/backward, then one ``all_reduce`` of all the gradients in a
    flat tensor. Its all-reduce moves the same bytes as ours, at the same point of the same step."""

    def __init__(self, work: Any):
        self.work = work
        self.model = work.build_model().to(work.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, step: int) -> None:
        batches = self.work.micro_batches(step)
        for inputs, targets in batches:
            (self.work.loss_fn(self.model(inputs), targets) / len(batches)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        dist.all_reduce(flat)
        for p in self.params:
            p.grad = None


def _profiled_rounds(steps: Dict[str, Callable[[int], object]], first: int, count: int) -> Dict[str, Any]:
    """For each contestant, per profiled step, the time its all-reduces took, and one step's bytes per kind.

    A collective's time is the minimum over ranks of its duration in the profiler: every rank's record ends
    when the collective completes, and the last rank to arrive waits for nobody, so its duration is the
    collective's own and not the skew between ranks. Contestants take turns step by step, as in the rounds.
    """
    out = {label: {"seconds": [], "bytes": {}, "count": 0} for label in steps}
    for i in range(count):
        for label, step in steps.items():
            mine = collectives(lambda: step(first + i))
            every = all_gather_object([c.duration_s for c in mine if c.kind == "all_reduce"])
            n = min(len(r) for r in every)
            out[label]["seconds"].append(sum(min(r[j] for r in every) for j in range(n)))
            if i == 0:
                out[label]["count"] = n
                for c in mine:
                    out[label]["bytes"][c.kind] = out[label]["bytes"].get(c.kind, 0) + c.nbytes
    return out


def report(result: Dict[str, Any], ctx: Any) -> Section:
    r = result
    w = r["workload"]
    default = next(v for v in r["variants"] if v["label"] == DEFAULT)
    checks: List[Check] = [
        check(NAME, "gradient sync bus bandwidth / raw all_reduce (gpt, default buckets)", r["efficiency"], ">=",
              BANDWIDTH_TARGET),
        check(NAME, "exposed communication / step (gpt, 2 ranks, default buckets)", default["exposed_fraction"], "<=",
              EXPOSED_TARGET),
    ]
    torch_ms = r["torch_ddp_allreduce"]["median"] * 1e3
    lines = [
        f"gpt example, {w['params']:,} parameters, global batch {w['global_batch']} on {r['world_size']} ranks; "
        f"{r['rounds']} interleaved rounds for step times, {r['profile_steps']} profiled steps per variant for "
        f"collectives. Bytes all-reduced per step (profiler): **{r['grad_bytes']:,}** (fp32 gradients: "
        f"4 x {w['params']:,} = {4 * w['params']:,}).\n",
        f"Raw `all_reduce` of {r['raw_bytes']:,} bytes (the gradients of the same step without DDP, in one flat "
        f"tensor): {r['raw_allreduce']['median'] * 1e3:.3f} ms "
        f"(IQR {r['raw_allreduce']['iqr'] * 1e3:.3f}), bus bandwidth {r['busbw_raw'] / 1e6:,.0f} MB/s. Our "
        f"gradient sync (default buckets): {default['collective_s']['median'] * 1e3:.3f} ms, "
        f"{default['busbw'] / 1e6:,.0f} MB/s: **{r['efficiency']:.0%}** of the raw all-reduce "
        f"(target >= {BANDWIDTH_TARGET:.0%}). For reference, torch's own DDP (built-in all-reduce, no distrain) in "
        f"the same step: {torch_ms:.3f} ms (IQR {r['torch_ddp_allreduce']['iqr'] * 1e3:.3f}), so ours takes "
        f"{default['collective_s']['median'] * 1e3 / torch_ms:.2f}x torch DDP's time: what separates either from the "
        f"raw all-reduce is DDP's in-backward all-reduce path, not distrain's hook.\n",
        "| variant | step median ms (IQR) | exposed comm ms (IQR) | exposed / step | all-reduces per step | "
        "bytes all-reduced | bytes on the wire per rank | all-reduce time ms | bus bandwidth MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in r["variants"]:
        lines.append(f"| {v['label']} | {v['step']['median'] * 1e3:.2f} ({v['step']['iqr'] * 1e3:.2f}) | "
                     f"{v['exposed']['median'] * 1e3:.2f} ({v['exposed']['iqr'] * 1e3:.2f}) | "
                     f"{v['exposed_fraction']:.1%} | {v['collectives_per_step']} | {v['bytes'].get('all_reduce', 0):,} | "
                     f"{v['wire_bytes']:,.0f} | {v['collective_s']['median'] * 1e3:.3f} | {v['busbw'] / 1e6:,.0f} |")
    lines.append(f"| no sync (compute only) | {r['no_sync']['median'] * 1e3:.2f} ({r['no_sync']['iqr'] * 1e3:.2f})"
                 f" | - | - | 0 | 0 | 0 | - | - |")
    lines.append("\nCompression hooks cut the bytes; on CPU their casts and PowerSGD's matrix products cost compute, "
                 "and with one bucket there is no backward left to hide the all-reduce behind.")
    lines += [f"- {n}" for n in r["notes"]]
    plots = [p for p in [ctx.plot_comm(result)] if p]
    return Section(TITLE, "\n".join(lines), checks, plots)
