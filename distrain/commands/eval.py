"""`distrain eval RUN_DIR|PATH [key=value ...]`: eval-split loss (and accuracy) of a checkpoint or an export,
in one process or on every rank under torchrun."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distrain.commands import OVERRIDES_HELP


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (or exported .safetensors) on its eval split")
    p.add_argument("path", metavar="RUN_DIR|PATH",
                   help="run directory (newest valid checkpoint), checkpoint directory, or exported .safetensors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + " (e.g. data.eval_batch=512)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from distrain.env import detect  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.inference.evaluate import evaluate_checkpoint, int8_summary, scores_text

    result = evaluate_checkpoint(Path(args.path), args.overrides)
    if detect().is_main:  # from the launcher's variables: the process group is gone by now, every rank looks alone
        if args.json:
            print(json.dumps(result))
        else:
            print(f"eval @ step {result['step']} ({result['checkpoint']}): {scores_text(result)}")
            if "fp32_bytes" in result:  # an int8 export: its size, and the fp32 weights' beside it
                print(f"  {int8_summary(result)}")
    return 0

