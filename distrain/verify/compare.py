"""`distrain verify`: run one config at several world sizes (same global batch) and prove they agree.

Each world size runs in its own torchrun job (`distrain.verify.worker`), which writes the final full weights
(safetensors), the final loss and the sample indices every rank consumed. W=1 (with gradient accumulation) is
the reference; every other world size must match it to float rounding when the strategy claims exactness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from safetensors.torch import load_file
import torch
from omegaconf import DictConfig

from distrain.config import load_config
from distrain.config.validation import AUTO, auto_plan
from distrain.errors import DistrainError, UsageError
from distrain.preflight import check_job
from distrain.verify.user_objects import FLAG, load_function


@dataclass
class WorldResult:
    world_size: int
    grad_accum: int
    final_loss: float
    weights: Dict[str, torch.Tensor]
    indices: List[int]  # every sample index consumed, over all ranks and steps (a multiset, sorted)


@dataclass
class Comparison:
    world_size: int
    grad_accum: int
    final_loss: float
    max_abs_diff: float
    max_rel_diff: float  # per tensor: max |a - b| / max |a|, then the max over tensors
    same_indices: bool
    key_difference: Optional[str] = None  # weight names only one of the two worlds has (then the diffs are inf)


def parse_worlds(text: str) -> List[int]:
    try:
        worlds = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--worlds {text!r} must be a comma-separated list of world sizes, e.g. 1,2,3.") from None
    if not worlds or any(w < 1 for w in worlds):
        raise UsageError(f"--worlds {text!r} must list positive world sizes, e.g. 1,2,3.")
    return worlds


def run_world(config: str, world_size: int, out_dir: Path, overrides: Sequence[str], timeout_s: float = 600,
              trainer_args: Optional[str] = None) -> WorldResult:
    """Train ``config`` with ``world_size`` gloo workers under torchrun and collect what the workers wrote;
    ``trainer_args`` names the user's function returning Trainer arguments (see distrain.verify.user_objects)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    user = [f"{FLAG}={trainer_args}"] if trainer_args else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
           "--module", "distrain.verify.worker", config, str(out_dir), *user, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reasons = [line for line in lines if "error:" in line]  # the worker's own one-paragraph message
        tail = "\n".join(reasons[:1] or lines[-15:])
        raise DistrainError(f"verify: the run at world size {world_size} failed (exit {proc.returncode}):\n{tail}")
    return read_world(out_dir, world_size)


def read_world(out_dir: Path, world_size: int) -> WorldResult:
    """What the workers of one world size wrote to ``out_dir``: result.json, weights.safetensors (rank 0) and
    every rank's indices.rank<R>.json."""
    result = json.loads((out_dir / "result.json").read_text())
    indices: List[int] = []
    for rank in range(world_size):
        indices += json.loads((out_dir / f"indices.rank{rank}.json").read_text())
    return WorldResult(world_size=world_size, grad_accum=result["grad_accum"], final_loss=result["loss"],
                       weights=load_file(str(out_dir / "weights.safetensors")), indices=sorted(indices))


def compare(reference: WorldResult, other: WorldResult) -> Comparison:
    max_abs, max_rel = 0.0, 0.0
    for name, ref in reference.weights.items():
        if name not in other.weights:
            continue
        diff = (other.weights[name].double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    difference = _key_difference(reference, other)
    if difference:
        max_abs = max_rel = float("inf")
    return Comparison(other.world_size, other.grad_accum, other.final_loss, max_abs, max_rel,
                      other.indices == reference.indices, difference)


def _key_difference(reference: WorldResult, other: WorldResult) -> Optional[str]:
    """Which weight names only one world has, in words (at most 8 of each), or None when they agree."""
    parts = []
    for world, mine, theirs in ((reference.world_size, reference.weights, other.weights),
                                (other.world_size, other.weights, reference.weights)):
        only = sorted(set(mine) - set(theirs))
        if only:
            parts.append(f"only world size {world} has {', '.join(only[:8])}" + (" ..." if len(only) > 8 else ""))
    return "; ".join(parts) or None


def fitted_micro_batch(cfg: DictConfig, world: int) -> List[str]:
    """``["train.micro_batch=M"]`` when the config's micro-batch is larger than one rank's share of the global batch
    at ``world`` ranks (a config sized for fewer ranks: gpt.yaml's 16 of 32 at W=4): the largest divisor of the share
    below it, said on the console; else []. The trajectory does not depend on the micro-batch, so verify may pick it;
    a micro-batch that merely does not divide the share is left for check_job to refuse."""
    micro, per_rank = cfg.train.micro_batch, int(cfg.train.global_batch) // world
    if micro in (None, AUTO) or int(cfg.train.global_batch) % world or int(micro) <= per_rank:
        return []
    fitted = auto_plan(int(cfg.train.global_batch), world, int(micro)).micro_batch
    print(f"distrain verify: world size {world}: train.micro_batch={micro} is more than one rank's share "
          f"({per_rank}) of train.global_batch={cfg.train.global_batch}; it runs at train.micro_batch={fitted} (the "
          f"trajectory does not depend on the micro-batch)", flush=True)
    return [f"train.micro_batch={fitted}"]


def verify(config: str, worlds: Sequence[int], overrides: Sequence[str] = (), steps: Optional[int] = None,
           workdir: Optional[Path] = None, trainer_args: Optional[str] = None, full_batch: bool = False
           ) -> List[Comparison]:
    """Run ``config`` at each world size; compare every one against the first (normally W=1).

    ``full_batch``: the reference is instead one rank training on each step's whole global batch in one forward
    (no accumulation), and every world size is compared with it: that also catches an objective that changes
    with micro_batch (a mean of per-micro-batch means), which W=1 with accumulation shares with every W.
    ``trainer_args``: ``MODULE:FUNCTION`` returning the Trainer's keyword arguments (your model, data, loss).
    """
    if trainer_args:
        load_function(trainer_args)  # a wrong name fails here, before any worker starts
    overrides = list(overrides) + ([f"train.steps={steps}"] if steps else [])
    cfg = load_config(config, overrides)
    runs = [(f"w{w}", w, fitted_micro_batch(cfg, w)) for w in worlds]
    for _, w, extra in runs:  # every world size must split the global batch; say so before starting anything
        check_job(load_config(config, overrides + extra) if extra else cfg, w)
    if full_batch:
        runs.insert(0, ("full-batch", 1, ["train.micro_batch=null"]))
    tmp = tempfile.TemporaryDirectory(prefix="distrain-verify-") if workdir is None else None
    root = Path(tmp.name) if tmp else Path(workdir)
    try:
        results = []
        for name, w, extra in runs:
            run_overrides = overrides + extra + [f"run.dir={root}", f"run.name={name}", "train.resume=never",
                                                 "checkpoint.every=0", "checkpoint.every_minutes=0",
                                                 "checkpoint.at_end=false", "metrics.progress=none"]
            results.append(run_world(config, w, root / name / "verify", run_overrides, trainer_args=trainer_args))
        return [compare(results[0], r) for r in results]
    finally:
        if tmp:
            tmp.cleanup()


def format_table(rows: Sequence[Comparison], tolerance: float, exact: bool = True) -> str:
    """One row per world size; beyond ``tolerance`` a row is a MISMATCH, or "approximate" when the strategy is not
    ``exact`` by design (a compressing comm hook, local SGD) and consumed the same samples."""
    lines = [f"{'world':>5} {'accum':>5} {'final loss':>12} {'max abs diff':>13} {'max rel diff':>13} "
             f"{'same samples':>12}  verdict"]
    for r in rows:
        ok = r.max_rel_diff <= tolerance and r.same_indices
        verdict = "ok" if ok else "approximate" if not exact and r.same_indices else "MISMATCH"
        lines.append(f"{r.world_size:>5} {r.grad_accum:>5} {r.final_loss:>12.6f} {r.max_abs_diff:>13.3e} "
                     f"{r.max_rel_diff:>13.3e} {str(r.same_indices):>12}  {verdict}")
    lines += [f"world size {r.world_size}: the weights differ in their names: {r.key_difference}"
              for r in rows if r.key_difference]
    return "\n".join(lines)
