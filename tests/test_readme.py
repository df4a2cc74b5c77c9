"""The README's promises: its first two commands exist, and CI runs exactly the README's test command."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

from conftest import REPO, child_env
from readme_commands import EXIT_CODES, FAST, VALIDATED, readme_blocks, readme_commands


def _readme_commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"^    (python3 -m venv .*)$", text, flags=re.M)


def test_readme_opens_with_quickstart_and_test_commands():
    quickstart, tests = _readme_commands()[:2]
    assert "distrain launch --nproc-per-node 2 configs/quickstart.yaml" in quickstart
    assert "-c constraints.txt" in quickstart and "-c constraints.txt" in tests  # never a CUDA download
    assert tests.endswith("python -m pytest")


def test_ci_runs_exactly_the_readme_test_command():
    tests = _readme_commands()[1]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_the_constraints_pin_satisfies_the_packages_own_torch_requirement():
    """`pip install -c constraints.txt -e .` must be solvable: the pinned torch is one pyproject.toml accepts."""
    from packaging.requirements import Requirement

    pins = [Requirement(line) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    torch_pin = next(p for p in pins if p.name == "torch")
    pinned = next(iter(torch_pin.specifier)).version
    # The dependencies list of pyproject.toml (tomllib is Python 3.11+; distrain supports 3.10).
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S).group(1)
    needed = next(Requirement(d) for d in re.findall(r'"([^"]+)"', dependencies) if Requirement(d).name == "torch")
    assert needed.specifier.contains(pinned), f"constraints.txt pins torch=={pinned}, pyproject.toml needs {needed}"


# --- every example command of the README runs as written (tests/workers/readme_commands.py says how each is checked) --
README = REPO / "README.md"


def _scratch(tmp_path: Path) -> Path:
    """A directory like a checkout's root for the README's commands: its configs and files, `.venv` = this Python's
    environment, so nothing the commands write (runs/, data/, job.yaml, exports) lands in the repository."""
    for name in ("configs", "examples", "launch", "docker", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return tmp_path


def _shell(command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``command`` through bash, as a reader pastes it; `distrain` and `python` are this environment's."""
    env = child_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = _shell(command, cwd)
    expected = EXIT_CODES.get(command, 0)
    assert proc.returncode == expected, f"`{command}` exited {proc.returncode}, not {expected}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_every_readme_command_is_run_or_validated():
    commands = readme_commands(README)
    assert len(commands) >= 30 and len(set(commands)) == len(commands)
    assert not set(VALIDATED) - set(commands), "VALIDATED lists commands the README no longer has"
    assert all(reason and check for reason, check in VALIDATED.values())
    assert not [c for c in commands if "..." in c or "<" in c.replace("2>", "")], "placeholders do not run as written"


def test_the_commands_this_machine_cannot_run_are_validated(tmp_path):
    scratch = _scratch(tmp_path)
    pyproject = (REPO / "pyproject.toml").read_text()
    for command, (reason, check) in VALIDATED.items():
        kind, _, name = check.partition(":")
        if kind == "marker":
            assert re.search(rf'^    "{name}: ', pyproject, re.M), f"`{command}`: no pytest marker {name}"
        elif kind == "extra":
            assert re.search(rf"^{name} = \[", pyproject, re.M), f"`{command}`: no extra [{name}]"
        else:
            proc = _shell(check, scratch, timeout=300)
            assert proc.returncode == 0, f"`{command}` ({reason}): `{check}` exited {proc.returncode}\n{proc.stderr}"


def test_the_fast_readme_commands_run_as_written(tmp_path):
    """The error example prints what the README shows; the k8s renders (the README's own used to exit 2: 32 ranks
    do not split micro-batches of 16 out of 32 samples) write manifests."""
    scratch = _scratch(tmp_path)
    blocks = [b for b in readme_blocks(README) if any(c.startswith(FAST) for c in b.commands)]
    assert len([c for b in blocks for c in b.commands]) >= 4
    for block in blocks:
        for command in block.commands:
            proc = _run_as_written(command, scratch)
            if block.output:  # a prompted block: the README shows this command's output
                assert " ".join(proc.stderr.split()) == " ".join(" ".join(block.output).split())
            if "k8s render" in command:
                manifests = list(yaml.safe_load_all(proc.stdout or (scratch / "job.yaml").read_text()))
                assert [d["kind"] for d in manifests][0] == "ConfigMap" and len(manifests) == 2


def _comparable(line: str) -> str:
    """A quickstart output line without what varies between machines (speed, ETA, save time)."""
    return re.sub(r" samples/s .*$|: [0-9.]+ MiB in .*$", "", line)


@pytest.mark.slow
def test_the_slow_readme_commands_run_as_written_in_order(tmp_path):
    """Every other command, in README order, in one scratch directory (the checkpoint, export, eval and plot
    commands use the runs the earlier ones made); the quickstart's output is the one the README shows."""
    scratch = _scratch(tmp_path)
    for command in readme_commands(README):
        if command.startswith(FAST):
            continue
        if command in VALIDATED:
            if "&& .venv/bin/distrain launch" not in command:
                continue
            command = command.rsplit("&& ", 1)[1]  # the quickstart, after the install
        proc = _run_as_written(command, scratch)
        if command == ".venv/bin/distrain launch --nproc-per-node 2 configs/quickstart.yaml":
            printed = [_comparable(line) for line in (proc.stdout + proc.stderr).splitlines()]
            shown = [_comparable(line) for line in _quickstart_output() if line != "..."]
            assert [line for line in shown if line not in printed] == [], "README's sample output is stale"
    assert (scratch / "runs" / "plot.png").stat().st_size > 0


def _quickstart_output() -> List[str]:
    """The lines the README says the quickstart prints: the indented block after 'What the quickstart prints'."""
    text = README.read_text().split("What the quickstart prints", 1)[1]
    return [line[4:] for line in text.split("\n\n", 2)[1].splitlines()]
