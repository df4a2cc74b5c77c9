"""`distrain slurm submit CONFIG --nodes N --nproc-per-node G [...] [-- SBATCH_OPTIONS] [key=value ...]`.

Renders ``launch/slurm.sbatch`` for this job - its ``#SBATCH`` defaults replaced by the flags given, the mode,
interpreter and workers per node exported at the top of the script - checks the config against the job's world
size (N x G) on the login node, and hands the script to ``sbatch``. ``--dry-run`` prints the rendered script and
the sbatch command instead. Options after ``--`` that are not ``key=value`` overrides go to sbatch unchanged
(``--account=proj``, ``--qos normal``); they override the rendered ``#SBATCH`` lines.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from distrain.commands import needs_action
from distrain.errors import UsageError

DEFAULT_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"
MODES = ("srun", "torchrun")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # train.steps=50, not --account=x


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("slurm", help="submit a training job to SLURM")
    actions = p.add_subparsers(dest="slurm_command", metavar="ACTION", parser_class=Parser)
    s = actions.add_parser("submit", help="render launch/slurm.sbatch for N nodes x G workers and sbatch it")
    s.add_argument("config", metavar="CONFIG", help="YAML config file")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides; after `--`, anything else goes to sbatch")
    s.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes to allocate")
    s.add_argument("--nproc-per-node", type=int, required=True, metavar="G",
                   help="workers per node (one per GPU on GPU nodes)")
    s.add_argument("--mode", choices=MODES, default="srun",
                   help="srun: one SLURM task per worker (default); torchrun: one torchrun per node")
    s.add_argument("--gpus-per-node", type=int, default=0, metavar="K", help="GPUs to request per node (default 0)")
    s.add_argument("--time", default=None, metavar="T", help="time limit, e.g. 04:00:00 (default: the script's)")
    s.add_argument("--partition", default=None, metavar="P", help="SLURM partition")
    s.add_argument("--job-name", default=None, metavar="NAME", help="job name (default: the config's run.name)")
    s.add_argument("--python", default=sys.executable, metavar="PY",
                   help="interpreter on the compute nodes (default: this one)")
    s.add_argument("--script", default=str(DEFAULT_SCRIPT), metavar="PATH",
                   help="sbatch template (default: launch/slurm.sbatch)")
    s.add_argument("--dry-run", action="store_true", help="print the rendered script and the sbatch command only")
    s.set_defaults(handler=run_submit, passthrough=[])  # the CLI puts everything after `--` in passthrough
    p.set_defaults(handler=needs_action("distrain slurm: choose an action: "
                                        "`distrain slurm submit CONFIG --nodes N --nproc-per-node G`."))


def split_extras(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(config overrides, sbatch options): `dotted.key=value` is an override, anything else goes to sbatch."""
    overrides = [a for a in items if _OVERRIDE.match(a) and not a.startswith("-")]
    return overrides, [a for a in items if a not in overrides]


def directives(args: argparse.Namespace, job_name: str) -> Dict[str, Optional[str]]:
    """The #SBATCH options this job sets (None: drop the template's line)."""
    out: Dict[str, Optional[str]] = {
        "job-name": job_name,
        "nodes": str(args.nodes),
        # torchrun mode still asks for G tasks per node: the CPUs (and GPUs) are counted per task, and the
        # script runs one torchrun per node over all of them.
        "ntasks-per-node": str(args.nproc_per_node),
    }
    if args.gpus_per_node:
        out["gpus-per-node"] = str(args.gpus_per_node)
    if args.time:
        out["time"] = args.time
    if args.partition:
        out["partition"] = args.partition
    return out


def render(template: str, options: Dict[str, Optional[str]], exports: Dict[str, str]) -> str:
    """Replace (or add) the template's ``#SBATCH --key=value`` lines and export ``exports`` after them."""
    lines = template.splitlines()
    pending = dict(options)
    last_directive = 0
    for i, line in enumerate(lines):
        match = re.match(r"^#{1,2}SBATCH\s+--([\w-]+)", line)
        if not match:
            continue
        last_directive = i
        key = match.group(1)
        if key in pending:
            value = pending.pop(key)
            lines[i] = f"#SBATCH --{key}={value}" if value is not None else f"##SBATCH --{key}"
    extra = [f"#SBATCH --{k}={v}" for k, v in pending.items() if v is not None]
    block = extra + ["# Set by `distrain slurm submit`:"] + [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
    return "\n".join(lines[:last_directive + 1] + block + lines[last_directive + 1:]) + "\n"


def run_submit(args: argparse.Namespace) -> int:
    from distrain.config import load_config  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.preflight import check_job

    for flag, value in (("--nodes", args.nodes), ("--nproc-per-node", args.nproc_per_node)):
        if value < 1:
            raise UsageError(f"{flag} {value} is not allowed: it must be at least 1.")
    if args.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node {args.gpus_per_node} is not allowed: it must be 0 or more.")
    script = Path(args.script)
    if not script.is_file():
        raise UsageError(f"--script {script}: no such file. Pass the path to an sbatch template such as the "
                         f"project's launch/slurm.sbatch.")
    overrides, sbatch_options = split_extras(list(args.overrides) + list(args.passthrough))
    config = str(Path(args.config).resolve())
    cfg = load_config(config, overrides)
    plan = check_job(cfg, args.nodes * args.nproc_per_node)  # fail here, not after waiting in the queue

    exports = {"DISTRAIN_SLURM_MODE": args.mode, "DISTRAIN_PYTHON": args.python,
               "DISTRAIN_NPROC_PER_NODE": str(args.nproc_per_node)}
    rendered = render(script.read_text(), directives(args, args.job_name or cfg.run.name), exports)
    command = ["sbatch", *sbatch_options, "<rendered script>", config, *overrides]
    summary = (f"# {args.nodes} node(s) x {args.nproc_per_node} worker(s) = world size {plan.world_size} "
               f"({args.mode} mode); global batch {plan.global_batch} = micro {plan.micro_batch} x accum "
               f"{plan.grad_accum} x world {plan.world_size}")
    if args.dry_run:
        print(rendered, end="")
        print(summary)
        print("# " + " ".join(shlex.quote(c) for c in command))
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the job).")
    # sbatch keeps its own copy of the script (a requeued job reruns that copy), so a temporary file will do.
    with tempfile.NamedTemporaryFile("w", prefix="distrain-", suffix=".sbatch", delete=False) as handle:
        handle.write(rendered)
    try:
        proc = subprocess.run([sbatch, *sbatch_options, handle.name, config, *overrides], capture_output=True,
                              text=True)
    finally:
        os.unlink(handle.name)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused the job (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    print(summary)
    print(proc.stdout.strip())
    return 0
