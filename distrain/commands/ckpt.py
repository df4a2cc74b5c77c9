"""`distrain ckpt ls|inspect|export`: list a run's checkpoints, look inside one, export consolidated weights."""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from distrain.commands import needs_action
from distrain.errors import UsageError
from distrain.telemetry.units import format_bytes


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("ckpt", help="list, inspect and export checkpoints")
    actions = p.add_subparsers(dest="ckpt_command", metavar="ACTION", parser_class=Parser)
    ls = actions.add_parser("ls", help="a run's checkpoints: step, time, world size, size, valid?")
    ls.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/NAME) or its checkpoints/ directory")
    ls.add_argument("--fast", action="store_true", help="check presence and sizes only, skip the sha256 checksums")
    ls.set_defaults(handler=run_ls)
    inspect = actions.add_parser("inspect", help="tensor names, shapes, dtypes and trainer state of a checkpoint")
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory, run directory, or exported .safetensors")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(handler=run_inspect)
    export = actions.add_parser("export", help="consolidated full weights to .safetensors (+ a JSON description)")
    export.add_argument("path", metavar="RUN_DIR|PATH", help="run directory (newest valid checkpoint) or checkpoint")
    export.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the weights")
    export.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8: weight-only int8 of every Linear/Conv weight, via torchao (docs/compression.md)")
    export.set_defaults(handler=run_export)
    p.set_defaults(handler=needs_action("distrain ckpt: choose an action: "
                                        "`ls RUN_DIR`, `inspect PATH` or `export RUN_DIR --out FILE`."))


def run_ls(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.checkpoint.discovery import checkpoints_dir_of, list_checkpoints

    path = Path(args.run_dir)
    if not path.is_dir():
        raise UsageError(f"RUN_DIR {str(path)!r} is not a directory; give a run directory such as runs/quickstart.")
    root = checkpoints_dir_of(path)
    rows = list_checkpoints(root, checksums=not args.fast)
    if not rows:
        print(f"no checkpoints in {root}")
        return 0
    print(f"{'checkpoint':<28} {'step':>8} {'saved':<19} {'world':>5} {'size':>10}  valid")
    for r in rows:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)) if r.created else "-"
        verdict = "yes" + (" (latest)" if r.latest else "") if r.problem is None else f"NO: {r.problem}"
        print(f"{r.name:<28} {r.step if r.step is not None else '-':>8} {saved:<19} "
              f"{r.world_size if r.world_size else '-':>5} {format_bytes(r.size_bytes):>10}  {verdict}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.checkpoint.inspect import describe

    info = describe(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"checkpoint: {info['path']}")
    for key, value in info["summary"].items():
        print(f"  {key}: {value}")
    print(f"tensors ({len(info['tensors'])}):")
    width = max((len(t["name"]) for t in info["tensors"]), default=4)
    for t in info["tensors"]:
        print(f"  {t['name']:<{width}}  {str(t['shape']):<16} {t['dtype']}")
    if info["values"]:
        print(f"other values ({len(info['values'])}): {', '.join(info['values'][:12])}"
              + (" ..." if len(info["values"]) > 12 else ""))
    return 0


def run_export(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.checkpoint.export import export_checkpoint
    from distrain.compression.quantized_export import to_int8, with_sparsity
    from distrain.inference.predict import build_described

    int8 = functools.partial(to_int8, build=build_described)
    steps = [with_sparsity] + ([int8] if args.quantize == "int8" else [])
    out, sidecar = export_checkpoint(Path(args.path), Path(args.out), steps)
    meta = json.loads(sidecar.read_text())
    print(f"exported {meta['model'].get('name', meta['model'].get('class'))} at step {meta['step']} from "
          f"{meta['source']} to {out} ({format_bytes(out.stat().st_size)}) and {sidecar}")
    if meta.get("sparsity"):
        layers = ", ".join(f"{name} {100 * v:.1f}%" for name, v in meta["sparsity"].items() if name != "total")
        print(f"pruned (zeros made permanent): {100 * meta['sparsity']['total']:.1f}% of the pruned tensors ({layers})")
    quantization = meta.get("quantization")
    if quantization:
        size, fp32 = out.stat().st_size, quantization["fp32_bytes"]
        print(f"int8: {len(quantization['tensors'])} weight(s) quantized ({quantization['scheme']}); "
              f"{format_bytes(size)} vs {format_bytes(fp32)} as fp32 ({size / fp32:.2f}x)")
    return 0
