"""The example commands of README.md, as a reader would copy them, and how tests/test_readme.py checks each.

A command is a line of an indented code block that starts like a shell command (``distrain``, ``python``,
``.venv/``, ``docker``, ``torchrun``, ``sbatch``), with a ``$ `` prompt and a trailing ``# comment`` removed and
``\\`` continuations joined. In a block with ``$ `` prompts the other lines are the output the README shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

STARTS = ("distrain ", "python", ".venv/", "docker ", "torchrun ", "sbatch ")


@dataclass
class Block:
    """One indented code block: its commands and, for a block with prompts, the output lines it shows."""

    commands: List[str]
    output: List[str]


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _block_commands(lines: List[str]) -> Block:
    prompted = any(line.startswith("$ ") for line in lines)
    commands: List[str] = []
    output: List[str] = []
    joining = False
    for line in lines:
        if joining:
            commands[-1] = commands[-1][:-1].rstrip() + " " + _strip_comment(line)
        elif line.startswith("$ ") or (not prompted and line.startswith(STARTS)):
            commands.append(_strip_comment(line.removeprefix("$ ")))
        elif prompted:
            output.append(line)
        joining = bool(commands) and commands[-1].endswith("\\")
    return Block(commands, output)


def readme_blocks(path: Path) -> List[Block]:
    """Every indented code block of ``path`` outside fenced (```) ones, in order."""
    blocks, current, fenced = [], [], False
    for raw in path.read_text().splitlines() + [""]:
        if raw.startswith("```"):
            fenced = not fenced
        if not fenced and raw.startswith("    ") and raw.strip():
            current.append(raw[4:])
            continue
        if current:
            blocks.append(_block_commands(current))
            current = []
    return blocks


def readme_commands(path: Path) -> List[str]:
    return [c for block in readme_blocks(path) for c in block.commands]


# Commands this machine cannot run as written, why, and what the test checks instead (a command run in the scratch
# directory that must exit 0, or "marker:NAME" / "extra:NAME": declared in pyproject.toml).
VALIDATED: Dict[str, tuple] = {
    "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[dev]' && "
    ".venv/bin/distrain launch --nproc-per-node 2 configs/quickstart.yaml":
        ("installs from the network; the launch after the last && runs as written in the slow test",
         ".venv/bin/distrain launch --help"),
    "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[dev]' && .venv/bin/python -m pytest":
        ("installs from the network, and is the test suite itself", ".venv/bin/python -m pytest --version"),
    "python -m benchmarks gpu": ("needs a GPU", "python -m benchmarks gpu --help"),
    ".venv/bin/python -m benchmarks": ("15 minutes of benchmarks", ".venv/bin/python -m benchmarks --help"),
    ".venv/bin/python -m pytest -m slurm": ("needs root and a SLURM cluster", "marker:slurm"),
    ".venv/bin/python -m pytest -m multinode": ("needs root and network namespaces", "marker:multinode"),
    ".venv/bin/python -m pytest -m trackers": ("MLflow and W&B installed, minutes", "marker:trackers"),
    ".venv/bin/pip install -c constraints.txt -e '.[ray]' && .venv/bin/python -m pytest -m ray":
        ("installs Ray from the network", "extra:ray"),
    ".venv/bin/python -m pytest -m slow": ("an hour of slow tests (this test is one of them)", "marker:slow"),
    ".venv/bin/python -m pytest -m bench": ("minutes of benchmark smoke runs", "marker:bench"),
    ".venv/bin/python -m pytest -m compile": ("minutes of torch.compile", "marker:compile"),
    "docker build -f docker/Dockerfile.cpu -t distrain:cpu .": ("no docker engine here", "test -f docker/Dockerfile.cpu"),
    "docker build -f docker/Dockerfile.gpu -t distrain:gpu .": ("no docker engine here", "test -f docker/Dockerfile.gpu"),
    "docker run --rm --gpus all --ipc=host distrain:gpu launch --nproc-per-node 4 configs/quickstart.yaml "
    "train.micro_batch=16":
        ("no docker engine and no GPUs here; the image's entry point is distrain: the config is checked for 4 workers",
         "distrain config show configs/quickstart.yaml --world-size 4 train.micro_batch=16"),
    "docker compose -f docker/compose.yaml up --build": ("no docker engine here", "test -f docker/compose.yaml"),
    "distrain launch --nproc-per-node 2 configs/quickstart.yaml 'metrics.trackers=[tensorboard,mlflow,wandb]' "
    "metrics.mlflow.tracking_uri=http://mlflow:5000 metrics.mlflow.experiment=digits metrics.wandb.project=digits "
    "metrics.wandb.mode=offline":
        ("needs an MLflow server at mlflow:5000; the same config and overrides are loaded and checked",
         "distrain config show configs/quickstart.yaml --world-size 2 'metrics.trackers=[tensorboard,mlflow,wandb]' "
         "metrics.mlflow.tracking_uri=http://mlflow:5000 metrics.mlflow.experiment=digits "
         "metrics.wandb.project=digits metrics.wandb.mode=offline"),
}

# Commands that run as written in the default test run (seconds, no training): everything else that VALIDATED does
# not list runs as written, in README order, in the slow test.
FAST = ("distrain train configs/quickstart.yaml train.micro_batch=48", "distrain k8s render ")

# Commands that exit non-zero on purpose (the README shows the error).
EXIT_CODES = {"distrain train configs/quickstart.yaml train.micro_batch=48": 2}
