"""`distrain predict PATH`: classes for digits images (--index N of the eval split, predicted vs true), or text
sampled from a char-level model (--prompt, --tokens, --temperature), from a checkpoint or an exported file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict with a built-in model: image classes or sampled text")
    p.add_argument("path", metavar="PATH",
                   help="exported .safetensors, checkpoint directory, or run directory (newest valid checkpoint)")
    p.add_argument("--index", type=int, action="append", metavar="N",
                   help="classify sample N of the data split (repeatable); classification/regression models")
    p.add_argument("--split", choices=("eval", "train"), default="eval", help="split --index reads (default eval)")
    p.add_argument("--prompt", default=None, help="text to continue (char-level models), e.g. 'def '")
    p.add_argument("--tokens", type=int, default=200, help="characters to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): same seed, same text")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from distrain.env import detect  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.errors import UsageError
    from distrain.inference import generate_text, load, predict_samples, unknown_characters

    if not detect().is_main:  # started under a launcher: one process answers, the others have nothing to add
        return 0

    if args.tokens < 0:
        raise UsageError(f"--tokens {args.tokens} is not allowed: it must be 0 or more.")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k} is not allowed: it must be at least 1.")
    loaded = load(args.path)
    task = loaded.spec.task
    reference = _int8_header(loaded, args.path)  # an int8 export: its size and the fp32 checkpoint beside it
    if task == "lm":
        if args.index:
            raise UsageError("--index is for classification/regression models; this is a language model: use "
                             "--prompt TEXT.")
        outside = unknown_characters(args.prompt or "")
        if outside:
            print(f"distrain: warning: --prompt has {len(outside)} character(s) outside the model's vocabulary "
                  f"({', '.join(map(repr, outside))}); each is read as the unknown character.", file=sys.stderr)
        text = generate_text(loaded.model, args.prompt if args.prompt is not None else "\n", tokens=args.tokens,
                             temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                             block_size=loaded.spec.extra.get("block_size"))
        print(text)
        return 0
    if args.prompt is not None:
        raise UsageError(f"--prompt is for char-level language models; this is a {task} model: use --index N.")
    fp32_rows = predict_samples(reference, args.index or [0], split=args.split) if reference else []
    for i, row in enumerate(predict_samples(loaded, args.index or [0], split=args.split)):
        if task == "classification":
            beside = (f"; fp32: predicted {fp32_rows[i]['predicted']} (p={fp32_rows[i]['probability']:.3f})"
                      if fp32_rows else "")
            print(f"{args.split}[{row['index']}]: predicted {row['predicted']} (p={row['probability']:.3f}), "
                  f"true {row['true']}{beside}")
        else:
            print(f"{args.split}[{row['index']}]: predicted {row['predicted']}, true {row['true']}")
    return 0


def _int8_header(loaded, path: str):
    """For an int8 export: print its size and eval scores beside the fp32 export's; return the fp32 checkpoint's
    model, if it is still there (its predictions are printed beside), else None."""
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.compression.int8_format import quantization_of
    from distrain.env import detect
    from distrain.inference import load
    from distrain.inference.evaluate import evaluate_checkpoint, int8_summary
    from distrain.telemetry.units import format_bytes

    if not quantization_of(loaded.meta):
        return None
    if detect().distributed:  # the other ranks have returned: no group to evaluate in, the sizes only
        size, fp32 = Path(path).stat().st_size, quantization_of(loaded.meta)["fp32_bytes"]
        print(f"int8 {format_bytes(size)} ({size / fp32:.2f}x); fp32 {format_bytes(fp32)} (run `distrain eval "
              f"{path}` for the scores beside each other)")
    else:
        print(f"eval: {int8_summary(evaluate_checkpoint(Path(path)))}")
    source = Path(loaded.meta.get("source", ""))
    return load(source) if source.is_dir() else None
