"""Suite 3, memory: per-rank bytes of parameters, gradients and optimizer state per strategy at W = 1, 2, 3.

Each strategy's ``memory_report`` (what its engine really allocated, shards counted locally) is taken just
before the optimizer update of the second step, when all three kinds exist, and compared with the planner's
ZeRO-formula prediction (distrain.tools.planner); target: within 10%. The same jobs measure the bytes each strategy
sends per step (torch.profiler's record of the collectives), against the planner's communication estimate.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from benchmarks.comm_count import collective_bytes, wire_bytes
from benchmarks.contestants import DistrainContestant, build_on_all_ranks, strategy_missing
from benchmarks.instrument import memory_before_update
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.workload import make_workload
from distrain import dist
from distrain.config import load_config
from distrain.env import ProcessInfo
from distrain.tools.planner import estimate, layouts

NAME = "memory"
TITLE = "3. Memory per rank vs the ZeRO formulas"
CONFIG = "configs/gpt.yaml"
# A global batch that splits over 1, 2 and 3 ranks (the memory of model states does not depend on it).
OVERRIDES = ["train.global_batch=24", "train.micro_batch=4"]
TARGET = 0.10
WORLDS = [1, 2, 3]
# A smoke run measures one layout of each engine at W=2 only.
SMOKE_LAYOUTS = ["ddp", "zero1", "fsdp (full shard)", "deepspeed stage 2", "accelerate", "local_sgd (H=4)"]


def run(opts: Options, worlds: List[int] = (), config: str = CONFIG, overrides: List[str] = tuple(OVERRIDES),
        only: List[str] = ()) -> Dict[str, Any]:
    """One job per world size; every available layout (or those labelled in ``only``) is measured in each job."""
    only = list(only) or (SMOKE_LAYOUTS if opts.smoke else [])
    chosen = [layout for layout in layouts() if not strategy_missing(layout.strategy)
              and (not only or layout.label in only)]
    skipped = {layout.label: strategy_missing(layout.strategy) for layout in layouts()
               if strategy_missing(layout.strategy)}
    out: Dict[str, Any] = {"config": config, "overrides": list(overrides), "skipped": skipped, "worlds": {}}
    for w in (worlds or ([2] if opts.smoke else WORLDS)):
        params = opts.job_params(config=config, overrides=list(overrides), layouts=[x.label for x in chosen])
        # Memory does not depend on speed: a third rank on two cores is fine here.
        out["worlds"][str(w)] = run_job(NAME, params, w, opts.threads_per_rank, opts.timeout_s)
    return out


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    work = make_workload(params["config"], params["overrides"], info, device, params["scratch"])
    n_params = sum(p.numel() for p in work.build_model().parameters())
    notes: List[str] = []
    rows = []
    for layout in layouts():
        if layout.label not in params["layouts"]:
            continue
        contestant = build_on_all_ranks(layout.label, lambda: DistrainContestant(work, layout.strategy, layout.kwargs),
                                        notes)
        if contestant is None:
            continue
        trainer = contestant.trainer
        report = memory_before_update(trainer, steps=2)
        # Traffic per step over a whole sync period (local SGD talks every `every` steps).
        before = trainer.strategy.comm_bytes
        profiled = collective_bytes(lambda: [trainer.train_step(2 + i) for i in range(layout.every)])
        counted = None if before is None else (trainer.strategy.comm_bytes - before) / layout.every
        contestant.close()
        rows.append({"label": layout.label, "ranks": dist.all_gather_object(report),
                     "collectives": dist.all_gather_object({k: v / layout.every for k, v in profiled.items()}),
                     "wire_bytes": dist.all_gather_object(wire_bytes(profiled, info.world_size) / layout.every),
                     "strategy_counted_bytes": dist.all_gather_object(counted)})
    return {"world_size": info.world_size, "params": n_params, "rows": rows, "notes": notes,
            "backend": torch.distributed.get_backend(),
            "workload": work.describe()}


def compare(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Measured (mean and max over ranks) against predicted bytes, per world size and layout."""
    cfg = load_config(_abs(result["config"]), result["overrides"])
    by_label = {layout.label: layout for layout in layouts()}
    out = []
    for w, job in result["worlds"].items():
        for row in job["rows"]:
            layout = by_label[row["label"]]
            accum = job["workload"]["grad_accum"]
            predicted = estimate(layout, job["params"], int(w), cfg.train, grad_accum=accum, backend=job["backend"])
            ranks = [_kinds(r) for r in row["ranks"]]
            totals = [sum(r.values()) for r in ranks]
            mean = sum(totals) / len(totals)
            kinds = {k: sum(r[k] for r in ranks) / len(ranks) for k in ("params", "grads", "optimizer")}
            sent = sum(row["wire_bytes"]) / len(row["wire_bytes"])
            out.append({"world": int(w), "label": row["label"], "formula": predicted.formula, "measured": kinds,
                        "measured_mean": mean, "measured_max": max(totals), "predicted": predicted.states,
                        "predicted_kinds": {"params": predicted.params, "grads": predicted.grads,
                                            "optimizer": predicted.optimizer},
                        "error": mean / predicted.states - 1, "sent_measured": sent,
                        "sent_predicted": predicted.comm_bytes})
    return out


def _kinds(report: Dict[str, int]) -> Dict[str, int]:
    """params / grads / optimizer, with any other state a strategy reports (DeepSpeed's fp32 master partition)
    counted with the optimizer, where the planner (and the ZeRO paper) put it."""
    out = {k: int(report.get(k, 0)) for k in ("params", "grads", "optimizer")}
    out["optimizer"] += sum(int(v) for k, v in report.items() if k not in out)
    return out


def _abs(config: str) -> str:
    from benchmarks.workload import REPO

    return str(REPO / config)


def report(result: Dict[str, Any], ctx: Any) -> Section:
    rows = compare(result)
    checks: List[Check] = []
    lines = [
        "Model states per rank of the gpt example (AdamW, fp32), measured by each strategy's `memory_report` "
        "just before the second update, vs the planner's formula (distrain.tools.planner). The paper's "
        "mixed-precision Adam formulas are stage 1: 4Ψ+12Ψ/N, stage 2: 2Ψ+14Ψ/N, stage 3: 16Ψ/N (2-byte "
        "parameters and gradients, 12 bytes of fp32 master copy and Adam moments). On CPU in fp32 every "
        "parameter and gradient is 4 bytes and Adam keeps 8, so the analogue is ddp 16Ψ, zero1 8Ψ+8Ψ/N, "
        "zero2 4Ψ+12Ψ/N, zero3 16Ψ/N; FSDP2 reshards after backward, so both of its modes hold 16Ψ/N between "
        "steps. DeepSpeed steps on an fp32 copy of each partition even in an fp32 run (4Ψ/N more: 8Ψ+12Ψ/N, "
        "4Ψ+16Ψ/N, 20Ψ/N); that copy is counted with the optimizer state.\n",
        "| N | strategy | formula | params | grads | optimizer | measured mean (max) | predicted | error | "
        "sent/step measured | sent/step predicted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = check(NAME, f"N={r['world']} {r['label']}: |measured/predicted - 1|", abs(r["error"]), "<=", TARGET)
        checks.append(c)
        m = r["measured"]
        lines.append(f"| {r['world']} | {r['label']} | {r['formula']} | {_kib(m['params'])} | {_kib(m['grads'])} | "
                     f"{_kib(m['optimizer'])} | {_kib(r['measured_mean'])} ({_kib(r['measured_max'])}) | "
                     f"{_kib(r['predicted'])} | {r['error']:+.1%} | {_kib(r['sent_measured'])} | "
                     f"{_kib(r['sent_predicted'])} |")
    lines.append("\nSizes in KiB. Sent/step: bytes each rank puts on the wire (ring collectives), from the profiler.")
    for job in result["worlds"].values():
        lines += [f"- N={job['world_size']}: {n}" for n in job["notes"]]
    lines += [f"- skipped **{k}**: {v}." for k, v in result["skipped"].items()]
    plots = [p for p in [ctx.plot_memory(rows)] if p]
    return Section(TITLE, "\n".join(lines), checks, plots)


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f}"
