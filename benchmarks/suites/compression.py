"""Compression (issue 22): what pruning, int8 export, QAT and compressing comm hooks cost and save, measured through
the real command line (`distrain train` on 2 gloo ranks, `ckpt export`, `eval --json`), each run to the same steps.

- digits CNN (configs/quickstart.yaml): fp32 vs int8 export (bytes, eval accuracy); 50% global magnitude pruning
  (export sparsity, accuracy against the unpruned run); QAT's int8 export against post-training int8 of the
  plain run. Targets: int8 <= 0.35x the bytes and within 0.5 accuracy points; pruned within 1 point and 50% +- 1%;
  QAT int8 >= post-training int8.
- gpt (configs/gpt.yaml): exact ddp, bf16, PowerSGD rank 1 and rank 4, gradient bytes per step (after PowerSGD's
  warm-up) and final eval loss; the exact run's int8 export's eval loss. Targets: PowerSGD rank 1 >= 10x fewer
  bytes than exact ddp; int8 eval loss within 2% of fp32.

Runnable by name (`python -m benchmarks compression`); not part of the default run (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.jobs import JobFailed, job_env
from benchmarks.options import Check, Options, Section, check
from benchmarks.workload import REPO

NAME = "compression"
TITLE = "Compression: pruning, int8 export, QAT, gradient compression"
CNN, GPT = "configs/quickstart.yaml", "configs/gpt.yaml"
CNN_RUNS = {"plain": [], "pruned 50%": ["train.prune.amount=0.5"], "qat int8": ["train.qat=int8"]}
GPT_RUNS = {"exact ddp": [], "bf16": ["strategy.kwargs.comm_hook=bf16"],
            "powersgd rank 1": ["strategy.kwargs.comm_hook=powersgd", "strategy.kwargs.powersgd_rank=1"],
            "powersgd rank 4": ["strategy.kwargs.comm_hook=powersgd", "strategy.kwargs.powersgd_rank=4"]}


def _cli(args: List[str], opts: Options, torchrun: bool = False) -> str:
    """Run `distrain ARGS` (on ``opts.nproc`` ranks under torchrun when ``torchrun``); returns its stdout."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(opts.nproc)] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "distrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=opts.timeout_s,
                          env=job_env(opts.threads_per_rank))
    if proc.returncode != 0:
        raise JobFailed(f"`distrain {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _train(config: str, root: Path, label: str, steps: int, overrides: List[str], opts: Options) -> Path:
    run_dir = root / label.replace(" ", "-").replace("%", "")
    _cli(["train", config, f"train.steps={steps}", f"run.dir={run_dir}", "run.name=run", "metrics.progress=none",
          "train.eval_every=0", f"train.log_every={max(1, steps // 10)}", *overrides], opts, torchrun=True)
    return run_dir / "run"


def _export_and_eval(run: Path, opts: Options) -> Dict[str, Any]:
    """fp32 and int8 exports of ``run``: their bytes, eval scores and the pruned tensors' sparsity."""
    out: Dict[str, Any] = {}
    for kind, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        path = run.parent / f"{kind}.safetensors"
        _cli(["ckpt", "export", str(run), "--out", str(path), *extra], opts)
        scores = json.loads(_cli(["eval", str(path), "--json"], opts).strip().splitlines()[-1])
        out[kind] = {"bytes": path.stat().st_size, **{k: v for k, v in scores.items() if k.startswith("eval_")}}
        out["sparsity"] = json.loads(path.with_suffix(".json").read_text()).get("sparsity")
    return out


def _comm(run: Path) -> Dict[str, Any]:
    """Gradient bytes per step between the last two log records (past PowerSGD's warm-up), and the final eval."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in records if "comm_bytes" in r]
    evals = [r for r in records if "eval_loss" in r]
    a, b = logged[-2], logged[-1]
    return {"bytes_per_step": (b["comm_bytes"] - a["comm_bytes"]) / (b["step"] - a["step"]),
            "eval_loss": evals[-1]["eval_loss"]}


def run(opts: Options) -> Dict[str, Any]:
    cnn_steps, gpt_steps = opts.pick(full=300, smoke=10), opts.pick(full=200, smoke=10)
    with tempfile.TemporaryDirectory(prefix="distrain-bench-compression-") as tmp:
        root = Path(tmp)
        cnn = {label: _export_and_eval(_train(CNN, root, label, cnn_steps, extra, opts), opts)
               for label, extra in CNN_RUNS.items()}
        gpt: Dict[str, Any] = {}
        for label, extra in GPT_RUNS.items():
            path = _train(GPT, root, f"gpt {label}", gpt_steps, extra, opts)
            gpt[label] = _comm(path)
            if label == "exact ddp":
                gpt[label]["exports"] = _export_and_eval(path, opts)
    return {"cnn": cnn, "gpt": gpt, "cnn_steps": cnn_steps, "gpt_steps": gpt_steps, "world_size": opts.nproc}


def _checks(r: Dict[str, Any]) -> List[Check]:
    plain, pruned, qat = r["cnn"]["plain"], r["cnn"]["pruned 50%"], r["cnn"]["qat int8"]
    exact = r["gpt"]["exact ddp"]
    return [
        check(NAME, "digits CNN: int8 export bytes / fp32", plain["int8"]["bytes"] / plain["fp32"]["bytes"], "<=",
              0.35),
        check(NAME, "digits CNN: fp32 - int8 eval accuracy (points)",
              100 * (plain["fp32"]["eval_accuracy"] - plain["int8"]["eval_accuracy"]), "<=", 0.5),
        check(NAME, "digits CNN: |pruned sparsity - 50%| (points)", 100 * abs(pruned["sparsity"]["total"] - 0.5), "<=",
              1.0),
        check(NAME, "digits CNN: unpruned - pruned eval accuracy (points)",
              100 * (plain["fp32"]["eval_accuracy"] - pruned["fp32"]["eval_accuracy"]), "<=", 1.0),
        check(NAME, "digits CNN: QAT int8 - post-training int8 eval accuracy (points)",
              100 * (qat["int8"]["eval_accuracy"] - plain["int8"]["eval_accuracy"]), ">=", 0.0),
        check(NAME, "gpt: exact ddp bytes / PowerSGD rank 1 bytes per step",
              exact["bytes_per_step"] / r["gpt"]["powersgd rank 1"]["bytes_per_step"], ">=", 10.0),
        check(NAME, "gpt: int8 eval loss / fp32 eval loss",
              exact["exports"]["int8"]["eval_loss"] / exact["exports"]["fp32"]["eval_loss"], "<=", 1.02),
    ]


def report(result: Dict[str, Any], ctx: Any) -> Section:
    r = result
    lines = [f"Every run: `distrain train` on {r['world_size']} gloo ranks; digits CNN {r['cnn_steps']} steps, gpt "
             f"{r['gpt_steps']} steps; exports by `distrain ckpt export [--quantize int8]`, scores by "
             f"`distrain eval --json`.\n",
             "| digits CNN run | export | bytes | eval accuracy | eval loss | sparsity of the pruned tensors |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, runs in r["cnn"].items():
        for kind in ("fp32", "int8"):
            e = runs[kind]
            sparsity = f"{100 * runs['sparsity']['total']:.1f}%" if runs.get("sparsity") else "-"
            lines.append(f"| {label} | {kind} | {e['bytes']:,} | {100 * e['eval_accuracy']:.2f}% | "
                         f"{e['eval_loss']:.4f} | {sparsity} |")
    lines += ["", "| gpt run | gradient bytes per step per rank | eval loss |", "| --- | --- | --- |"]
    for label, g in r["gpt"].items():
        lines.append(f"| {label} | {g['bytes_per_step']:,.0f} | {g['eval_loss']:.4f} |")
    exports = r["gpt"]["exact ddp"]["exports"]
    lines.append(f"\ngpt exact ddp exports: fp32 {exports['fp32']['bytes']:,} bytes, eval loss "
                 f"{exports['fp32']['eval_loss']:.4f}; int8 {exports['int8']['bytes']:,} bytes, eval loss "
                 f"{exports['int8']['eval_loss']:.4f}.")
    return Section(TITLE, "\n".join(lines), _checks(r), [])
