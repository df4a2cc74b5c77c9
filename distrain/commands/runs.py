"""`distrain runs [ls [DIR]]`: the runs in a run directory with status, steps, final loss, best eval and wall time."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("runs", help="list runs and their status")
    actions = p.add_subparsers(dest="runs_command", metavar="ACTION", parser_class=Parser)
    ls = actions.add_parser("ls", help="list the runs in DIR (default runs/)")
    ls.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="a run.dir (default runs)")
    ls.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    ls.set_defaults(handler=run_ls)
    p.set_defaults(handler=run_ls, dir="runs", json=False)  # `distrain runs` alone: the runs in runs/, like ls


def run_ls(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.tools.runs import format_runs, list_runs

    rows = list_runs(args.dir)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"distrain runs: no runs in {args.dir} (a run directory holds run.json and metrics.jsonl)")
    return 0
