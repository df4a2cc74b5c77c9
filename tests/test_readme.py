"""The README's promises: its first two commands exist, and CI runs exactly the README's test command."""

import re

from conftest import REPO


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
