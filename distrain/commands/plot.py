"""`distrain plot RUN_DIR [RUN_DIR ...] [--out FILE]`: compare runs in one headless PNG (see distrain.tools.plotting)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot loss, eval, throughput and step time of one or more runs into one image")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (run.dir/run.name), or a directory of runs such as runs/")
    p.add_argument("--out", default=None,
                   help="image to write; the extension picks the format (default: plot.png in the run directory "
                        "given, or in the directory holding all those given)")
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.tools.plotting import plot_runs

    out, names = plot_runs(args.runs, args.out, title=args.title)
    print(f"distrain plot: wrote {out} comparing {len(names)} run(s): {', '.join(names)}")
    return 0
