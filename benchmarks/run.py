"""The benchmark command: ``python -m benchmarks [SUITE ...]`` (and ``distrain bench``, the same thing).

Runs the chosen suites (all six by default), writes ``benchmarks/results/<date>-<host>.json`` with every raw
number plus the machine it came from, renders ``BENCHMARKS.md`` with the plots, and prints every target check.
Exit code 0 when every suite ran (a missed target is a measurement, not a failure), 1 when a suite failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.suites import EXTRA_SUITES, SUITES

REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m benchmarks` and `distrain bench`."""
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"suites to run (default: all of {', '.join(SUITES)}; also: {', '.join(EXTRA_SUITES)})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny rounds: checks that every suite runs (about a minute), numbers not meaningful")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA GPUs with NCCL when there are any, else CPU processes on gloo")
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks per job (default: 2 on CPU, every GPU on CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default: per suite)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the results JSON and the plots go (default benchmarks/results)")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="run nothing: render the report and plots again from a saved results JSON")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="the report to write (default: BENCHMARKS.md at the repository root for a full run of "
                             "every suite; OUT_DIR/TAG/BENCHMARKS.md for a smoke run or a subset)")


def options_from(args: argparse.Namespace) -> Any:
    import torch

    from benchmarks.options import Options

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from distrain.errors import UsageError

        raise UsageError("--device cuda, but torch sees no CUDA device here. Use --device cpu (or auto).")
    nproc = args.nproc or (torch.cuda.device_count() if device == "cuda" else 2)
    return Options(smoke=args.smoke, device=device, nproc=nproc, threads_per_rank=1, rounds=args.rounds)


def chosen_suites(names: Sequence[str]) -> List[str]:
    from distrain.errors import UsageError

    unknown = [n for n in names if n not in SUITES + EXTRA_SUITES]
    if unknown:
        raise UsageError(f"Unknown benchmark suite(s) {', '.join(unknown)}. Available: "
                         f"{', '.join(SUITES + EXTRA_SUITES)}.")
    return list(names) or list(SUITES)


def run(args: argparse.Namespace, command: Optional[str] = None) -> int:
    """Run the suites ``args`` asks for, write the JSON and BENCHMARKS.md; returns the exit code."""
    from benchmarks import machine
    from benchmarks.render import render

    if args.render is not None:
        return rerender(args)
    suites = chosen_suites(args.suites)
    opts = options_from(args)
    # A smoke run or a subset of suites must not overwrite the full run's report and plots: it gets its own tag.
    tag = "-".join((["smoke"] if opts.smoke else []) + ([] if suites == SUITES else suites))
    plot_dir = args.out_dir / tag if tag else args.out_dir
    markdown = args.markdown or (plot_dir / "BENCHMARKS.md" if tag else REPO / "BENCHMARKS.md")
    plot_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "command": (command or "python -m benchmarks " + " ".join(sys.argv[1:])).strip(),
        "machine": machine.describe(opts.threads_per_rank, opts.device),
        "options": {"smoke": opts.smoke, "device": opts.device, "nproc": opts.nproc,
                    "threads_per_rank": opts.threads_per_rank, "rounds": opts.rounds},
        "suites": {}, "suite_seconds": {}, "load_average": {},
    }
    started = time.perf_counter()
    failed = []
    for name in suites:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.suites.{name}")
        try:
            results["suites"][name] = module.run(opts)
        except Exception as err:  # one broken suite must not cost the others' numbers
            failed.append(name)
            results["suites"][name] = {"error": f"{type(err).__name__}: {err}"}
        results["suite_seconds"][name] = round(time.perf_counter() - t0, 1)
        results["load_average"][name] = machine.load_average()
        print(f"[bench] {name}: {'FAILED' if name in failed else 'done'} in {results['suite_seconds'][name]:.0f} s "
              f"(load average {results['load_average'][name]})", flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = machine.load_average()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    path = args.out_dir / f"{stamp}-{socket.gethostname()}{'-' + tag if tag else ''}.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    checks = render(results, markdown, plot_dir, path)
    print(f"[bench] wrote {path} and {markdown}")
    for c in checks:
        print(f"[bench] {'met   ' if c.met else 'MISSED'} {c.suite}: {c.name} = {c.value:.3f} (target {c.target})")
    for name in failed:
        print(f"[bench] suite {name} failed: {results['suites'][name]['error']}", file=sys.stderr)
    return 1 if failed else 0


def rerender(args: argparse.Namespace) -> int:
    """The report and plots of a saved run, drawn again (after a change to how they are drawn)."""
    from benchmarks.render import render
    from distrain.errors import UsageError

    if not args.render.is_file():
        raise UsageError(f"--render {args.render}: no such results file (they are in benchmarks/results/).")
    results = json.loads(args.render.read_text())
    full = not results["options"]["smoke"] and list(results["suites"]) == SUITES
    plot_dir = args.render.parent if full else args.render.parent / args.render.stem
    markdown = args.markdown or (REPO / "BENCHMARKS.md" if full else plot_dir / "BENCHMARKS.md")
    plot_dir.mkdir(parents=True, exist_ok=True)
    render(results, markdown, plot_dir, args.render)
    print(f"[bench] rendered {markdown} from {args.render}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from distrain.errors import DistrainError

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DistrainError as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return err.exit_code
