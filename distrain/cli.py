"""The `distrain` command: a thin front door over the Python API and torch's own elastic launcher.

Each subcommand lives in its own module under ``distrain/commands/`` with ``register(subparsers)`` (adds its
parser and sets ``handler``). Every user mistake becomes one paragraph on stderr and exit code 2; runtime
failures exit 1. No tracebacks for things the user can fix.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import textwrap
from typing import Callable, Optional, Sequence

from distrain.errors import DistrainError, DistributedError, StorageError, UsageError

# One module per subcommand, in the order `distrain --help` lists them.
COMMAND_MODULES = [
    "distrain.commands.train",
    "distrain.commands.launch",
    "distrain.commands.verify",
    "distrain.commands.config",
    "distrain.commands.ckpt",
    "distrain.commands.eval",
    "distrain.commands.predict",
    "distrain.commands.slurm",
    "distrain.commands.k8s",
    "distrain.commands.ray",
    "distrain.commands.runs",
    "distrain.commands.plot",
    "distrain.commands.doctor",
    "distrain.commands.plan",
    "distrain.commands.bench",
    "distrain.commands.data",
]


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a UsageError (one paragraph, exit 2) instead of its own exit.

    ``lazy_arguments``: a function that adds arguments only when this (sub)command is really parsed, for options
    whose definition is expensive to import (`distrain bench`'s suites): every worker builds the whole parser.
    """

    lazy_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}. Run `{self.prog} --help` for usage.")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        add, self.lazy_arguments = self.lazy_arguments, None
        if add is not None:
            add(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distrain", description="Distributed data-parallel training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _paragraph(message: str) -> str:
    # Never break inside a word: paths and keys in the message stay whole, so they can be copied.
    return textwrap.fill(" ".join(message.split()), width=100, break_on_hyphens=False, break_long_words=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `distrain` and `python -m distrain`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if "--" in extra and hasattr(args, "passthrough"):  # `slurm submit ... -- SBATCH_OPTIONS`: theirs, unparsed
            cut = extra.index("--")
            extra, args.passthrough = extra[:cut], extra[cut + 1:]
        # key=value overrides may come after options (`verify CONFIG --worlds 1,2 train.steps=5`).
        stray = [a for a in extra if "=" not in a or a.startswith("-")]
        if stray or (extra and not hasattr(args, "overrides")):
            raise UsageError(f"distrain: unrecognized arguments: {' '.join(stray or extra)}. "
                             f"Run `distrain --help` for usage.")
        if extra:
            args.overrides = list(args.overrides) + extra
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except DistrainError as err:
        if should_report() or isinstance(err, DistributedError):  # a distributed failure differs per rank
            print(f"distrain: error: {_paragraph(str(err))}", file=sys.stderr)
        _record_for_launcher(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("distrain: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # lazy: start-up: the CLI parser loads every command, the work loads on use
        from distrain.storage_errors import is_storage_error

        if not is_storage_error(err):
            _record_for_launcher(err)
            raise
        report = _storage_error(err)
        print(f"distrain: error: {_paragraph(str(report))}", file=sys.stderr)
        _record_for_launcher(report)
        return report.exit_code
    except Exception as err:
        _record_for_launcher(err)
        raise


def _storage_error(err: OSError) -> StorageError:
    """A write the disk refused (full, quota, file-size limit, read-only), as one paragraph with what to do."""
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.storage_errors import write_failure_hint

    where = f"'{err.filename}'" if err.filename else "a file"
    hint = write_failure_hint(err.filename or os.getcwd())
    return StorageError(f"Writing {where} failed: {err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"
                        + (f", because {hint}" if hint else "") + ". Free space or raise the limit, or point run.dir "
                        "at another disk; checkpoints already committed are intact and the run resumes from the "
                        "latest one.")


def _record_for_launcher(err: BaseException) -> None:
    """Under torchrun, write this worker's error file: the launcher then reports which rank failed first, and why."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # lazy: start-up: the CLI parser loads every command, the work loads on use
        from distrain.faults import record_error_file

        record_error_file(err)


def should_report() -> bool:
    """Under a launcher every rank hits the same config error: let rank 0 alone say it.

    Unless the launcher variables themselves are broken (a rank outside [0, world), a world without a rank 0
    to speak): then this process may be the only one, and it reports.
    """
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS"))
    try:
        r, w = int(rank), int(world) if world is not None else None
    except ValueError:
        return True
    return r == 0 or w is None or not 0 <= r < w
