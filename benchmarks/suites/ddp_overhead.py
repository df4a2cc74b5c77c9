"""Issue 3's benchmark: median step time of distrain's ddp against a hand-written torch DDP loop, on the same
model, data and batch (2 ranks, gloo), interleaved in one job per model; prints the ratio (target <= 1.02).

It is the ddp row of the step-time suite, runnable alone: ``python -m benchmarks ddp_overhead`` or
``python benchmarks/ddp_overhead.py``.
"""

from __future__ import annotations

from typing import Any, Dict

from benchmarks.options import Options, Section
from benchmarks.suites import step_time

NAME = "ddp_overhead"
TITLE = "distrain ddp vs a hand-written torch DDP loop"


def run(opts: Options) -> Dict[str, Any]:
    return step_time.run(opts, pairs=["ddp"], models=["mlp"] if opts.smoke else list(step_time.MODELS))


def report(result: Dict[str, Any], ctx: Any) -> Section:
    section = step_time.report(result, ctx, notes=False)  # the step_time section carries the notes
    section.title = TITLE
    for c in section.checks:
        c.suite = NAME
    return section
