"""BENCHMARKS.md from a results JSON: the machine, the method, every target with its measured value, then one
section (tables and plots) per suite."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.options import Check, Section
from benchmarks.plots import Plotter

METHOD = """\
**Method.** Every contestant trains the same model on the same data with the same global batch, micro-batch,
optimizer and precision; models are built from one seed and read global step *s*'s samples from the same
global-step sampler. distrain's side is `Trainer.train_step(step)` (the loop body); the other side is the same
training hand-written against the raw engine (torch DDP, `ZeroRedundancyOptimizer`, FSDP2 `fully_shard`,
`deepspeed.initialize`, `accelerate.Accelerator`, `PeriodicModelAverager`). All contestants of a comparison
live in the same worker processes (one torchrun job) and take turns step by step, in rounds, each round in a
fresh seeded random order (the same on every rank), so neither machine noise nor position nor the previous
contestant's leftovers favour anyone. Each step is timed between two
barriers (after a device synchronisation on GPUs); warm-up rounds are not timed. Reported: median and
interquartile range (IQR); ratios are ratios of medians with a 95% bootstrap interval over paired rounds.
"""


def _machine_table(meta: Dict[str, Any], options: Dict[str, Any]) -> List[str]:
    rows = [("date", meta["date"]), ("host", meta["host"]), ("platform", meta["platform"]),
            ("CPU", f"{meta['cpu']} ({meta['cores_usable']} usable cores)"), ("memory", f"{meta['memory_gib']} GiB"),
            ("device / backend", f"{options['device']} / {'nccl' if options['device'] == 'cuda' else 'gloo'}, "
                                 f"{options['nproc']} ranks per job"),
            ("python", meta["python"]), ("distrain", f"{meta['distrain']}, commit {meta.get('commit', 'not recorded')}"),
            ("versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())),
            ("threads", ", ".join(f"{k}: {v}" for k, v in meta["threads"].items())),
            ("load average (1, 5, 15 min)", f"at start {meta['load_average_at_start']}, at end "
                                            f"{meta.get('load_average_at_end', '?')}")]
    if meta.get("gpus"):
        rows.append(("GPUs", ", ".join(meta["gpus"]) + f" (CUDA {meta.get('cuda')}, NCCL {meta.get('nccl')})"))
    return ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]


def sections(results: Dict[str, Any], plot_dir: Path) -> List[Section]:
    """Each suite's Section, in the order the suites ran."""
    plotter = Plotter(plot_dir)
    out = []
    for name, result in results["suites"].items():
        module = importlib.import_module(f"benchmarks.suites.{name}")
        if "error" in result:
            out.append(Section(module.TITLE, f"**The suite failed:**\n\n```\n{result['error']}\n```", []))
            continue
        out.append(module.report(result, plotter))
    return out


def render(results: Dict[str, Any], markdown_path: Path, plot_dir: Path, results_path: Path) -> List[Check]:
    """Write BENCHMARKS.md (and the plots) for ``results``; returns every target check."""
    meta, options = results["machine"], results["options"]
    secs = sections(results, plot_dir)
    checks = [c for s in secs for c in s.checks]
    base = markdown_path.parent
    lines = ["# Benchmarks", "",
             f"Produced by `{results['command']}` in {results['elapsed_s'] / 60:.1f} minutes"
             + (" (**smoke run**: tiny rounds, numbers not meaningful)" if options["smoke"] else "")
             + f". Raw data: [{_rel(results_path, base)}]({_rel(results_path, base)}).", "",
             "## Machine", ""] + _machine_table(meta, options) + ["", METHOD]
    if meta["cores_usable"] and meta["cores_usable"] <= 4 and options["device"] == "cpu":
        lines += ["This machine is small and shared: other processes compete for its cores, which shows as a wide "
                  "IQR. Interleaving keeps the comparisons fair under that noise; the absolute times are not "
                  "those of a quiet machine.", ""]
    lines += ["## Targets", "", "| suite | measurement | value | target | met |", "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c.suite} | {c.name} | {c.value:.3f} | {c.target} | {'yes' if c.met else '**no**'} |")
    met = sum(c.met for c in checks)
    lines += ["", f"{met} of {len(checks)} targets met.", ""]
    for name, s in zip(results["suites"], secs):
        lines += [f"## {s.title}", "", s.markdown, ""]
        lines += [f"![{p.stem}]({_rel(p, base)})\n" for p in s.plots]
        if name in results.get("suite_seconds", {}):
            lines += [f"*This suite ran for {results['suite_seconds'][name]:.0f} s; load average (1, 5, 15 min) "
                      f"when it ended: {results['load_average'][name]} on {meta['cores_usable']} cores.*", ""]
    markdown_path.write_text("\n".join(lines).rstrip() + "\n")
    return checks


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(base).resolve())
