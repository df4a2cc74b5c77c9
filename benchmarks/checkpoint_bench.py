"""Checkpoint save time, size, and the training stall of synchronous vs asynchronous saves.

    python benchmarks/checkpoint_bench.py [--nproc 2] [--rounds 4] [--window 5] [--embed 64 --layers 2]

Runs the gpt example (configs/gpt.yaml) on ``--nproc`` gloo ranks under torchrun. Rounds interleave three kinds
of windows of ``--window`` training steps each, so a noisy shared CPU hits all three alike:
    none   no save: the baseline step time;
    sync   ``Checkpointer.save(blocking=True)``, then the window: the loop stops for the whole save;
    async  ``Checkpointer.save(blocking=False)`` (``dcp.async_save``), then the window: the loop stops only to
           stage the state in memory, while the write, the manifest and the commit run in the background.
The stall a save causes is (time of the save call + the window's steps) - (window x baseline step time): for
async this includes the steps slowed by the background write competing for the same cores.
Prints a markdown table; ``run()`` returns the numbers (and the table) to the benchmark suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "sync", "async")


def worker(out: Path, rounds: int, window: int, overrides: List[str]) -> None:
    """One rank: train the gpt example, timing windows of steps after no save / a sync save / an async save."""
    from distrain import dist
    from distrain.training.trainer import Trainer

    with Trainer(str(REPO / "configs" / "gpt.yaml"), overrides=overrides) as trainer:
        ckpt = trainer.checkpointer
        for _ in range(2):  # warm-up: first-step allocations, optimizer state
            trainer.train_step(trainer.step)
            trainer.step += 1
        rows: List[Dict[str, Any]] = []
        for _ in range(rounds):
            for mode in MODES:
                dist.barrier()
                started = time.perf_counter()
                if mode != "none":
                    ckpt.save(trainer.step, reason=f"bench-{mode}", blocking=mode == "sync")
                blocked = time.perf_counter() - started
                steps = []
                for _ in range(window):
                    t0 = time.perf_counter()
                    trainer.train_step(trainer.step)
                    trainer.step += 1
                    steps.append(time.perf_counter() - t0)
                total = time.perf_counter() - started
                waited = time.perf_counter()
                ckpt.wait()  # an async save not finished within the window: counted apart, not as stall
                rows.append({"mode": mode, "blocked_s": blocked, "window_s": total, "steps_s": steps,
                             "unfinished_s": time.perf_counter() - waited, "save_s": ckpt.last_save_s,
                             "bytes": ckpt.last_save_bytes})
        if dist.rank() == 0:
            out.write_text(json.dumps({"rows": rows, "world_size": trainer.info.world_size,
                                       "params": sum(p.numel() for p in trainer.strategy.module.parameters())}))


def summarise(data: Dict[str, Any], window: int) -> Dict[str, Any]:
    rows = data["rows"]
    base = statistics.median(s for r in rows if r["mode"] == "none" for s in r["steps_s"])
    out: Dict[str, Any] = {"world_size": data["world_size"], "params": data["params"], "baseline_step_s": base}
    for mode in ("sync", "async"):
        mine = [r for r in rows if r["mode"] == mode]
        stalls = [r["window_s"] - window * base for r in mine]
        out[mode] = {
            "saves": len(mine), "size_bytes": mine[-1]["bytes"],
            "save_s": statistics.median(r["save_s"] for r in mine),
            "blocked_s": statistics.median(r["blocked_s"] for r in mine),
            "stall_s": statistics.median(stalls),
            "stall_steps": statistics.median(stalls) / base,
            "unfinished_after_window_s": statistics.median(r["unfinished_s"] for r in mine),
        }
    out["async_vs_sync_stall"] = out["async"]["stall_s"] / out["sync"]["stall_s"] if out["sync"]["stall_s"] else None
    return out


def markdown(summary: Dict[str, Any], label: str) -> str:
    lines = [f"{label}: {summary['params']:,} parameters, {summary['world_size']} ranks (gloo), baseline step "
             f"{summary['baseline_step_s'] * 1e3:.1f} ms (median).\n",
             "| save | size | save time (to commit) | training blocked | stall per save | stall in steps | "
             "still writing after window |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("sync", "async"):
        m = summary[mode]
        lines.append(f"| {mode} | {m['size_bytes'] / 2**20:.2f} MiB | {m['save_s'] * 1e3:.0f} ms | "
                     f"{m['blocked_s'] * 1e3:.0f} ms | {m['stall_s'] * 1e3:.0f} ms | {m['stall_steps']:.2f} | "
                     f"{m['unfinished_after_window_s'] * 1e3:.0f} ms |")
    ratio = summary["async_vs_sync_stall"]
    if ratio is not None:
        lines.append(f"\nasync stall / sync stall = {ratio:.2f}")
    return "\n".join(lines)


def measure(nproc: int, rounds: int, window: int, embed: int, layers: int, timeout_s: float = 900) -> Dict[str, Any]:
    """Launch the workers under torchrun and summarise what rank 0 recorded."""
    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-bench-") as tmp:
        out = Path(tmp) / "result.json"
        overrides = [f"run.dir={tmp}", "run.name=bench", "train.resume=never", "checkpoint.every=0",
                     "checkpoint.at_end=false", "checkpoint.async_save=true", "checkpoint.keep_last=2",
                     "metrics.progress=none", "train.eval_every=0", "train.steps=1000000", "train.warmup_steps=0",
                     f"model.kwargs.embed={embed}", f"model.kwargs.layers={layers}", "data.kwargs.max_chars=300000"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(Path(__file__).resolve()), "--worker", str(out), str(rounds), str(window), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"checkpoint benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return summarise(json.loads(out.read_text()), window)


def run(smoke: bool = False, nproc: int = 2) -> Dict[str, Any]:
    """Entry point for `python -m benchmarks` (suite 5): the gpt example, and a 16x larger GPT unless ``smoke``."""
    rounds, window = (1, 2) if smoke else (4, 5)
    results: Dict[str, Any] = {"gpt_example": measure(nproc, rounds, window, embed=64, layers=2)}
    if not smoke:
        results["gpt_larger"] = measure(nproc, rounds, window, embed=256, layers=4)
    labels = {"gpt_example": "gpt example (embed 64, 2 layers)", "gpt_larger": "larger GPT (embed 256, 4 layers)"}
    results["markdown"] = "\n\n".join(markdown(v, labels[k]) for k, v in results.items() if k in labels)
    return results


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--window", type=int, default=5, help="training steps timed after each save")
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args()
    summary = measure(args.nproc, args.rounds, args.window, args.embed, args.layers)
    print(markdown(summary, f"gpt (embed {args.embed}, {args.layers} layers)"))
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
