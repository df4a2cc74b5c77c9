"""Every optional dependency distrain names in an error message is installed by the pip extra it names."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO
from distrain.extras import EXTRAS, install_hint

DECLARED = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _installs(extra: str, package: str) -> bool:
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in DECLARED[extra]}
    pip_name = {"PIL": "pillow", "kubeflow": "kubeflow-training"}.get(package, package).lower()
    return pip_name in names or f"{pip_name}[train]" in names


def test_each_named_extra_exists_and_installs_its_package():
    for package, extra in EXTRAS.items():
        assert extra in DECLARED, f"{package}: extra {extra!r} is not in pyproject.toml"
        assert _installs(extra, package), f"extra {extra!r} does not install {package}"
        assert install_hint(package) == f"pip install 'distrain[{extra}]'"


def test_messages_that_spell_out_an_extra_name_a_declared_one():
    for path in (REPO / "distrain").rglob("*.py"):
        for extra in re.findall(r"distrain\[(\w+)\]", path.read_text()):
            assert extra in DECLARED, f"{path}: distrain[{extra}] is not declared"
