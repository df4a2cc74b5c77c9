"""The machine a benchmark ran on: host, CPU, memory, accelerators, versions, thread settings and load.

Recorded with every result, because a number without its machine (and, on a shared box, without the load the
other tenants put on it) cannot be compared with anything.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_commit() -> str:
    """The commit the numbers are of (``+changes`` when the checkout differs from it), or "unknown" outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+changes" if changed else commit


def describe(threads_per_rank: int, device: str) -> Dict[str, Any]:
    """Everything about this machine and software that shapes the numbers."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    info: Dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cores_usable": cores,
        "memory_gib": round(mem / 2**30, 1),
        "device": device,
        "versions": {name: _version(name) for name in ("torch", "deepspeed", "accelerate", "numpy", "omegaconf")},
        "distrain": _version("distrain"),
        "commit": source_commit(),
        "threads": {"OMP_NUM_THREADS per rank": threads_per_rank,
                    "torch intra-op threads in this process": torch.get_num_threads(),
                    "torch inter-op threads in this process": torch.get_num_interop_threads()},
        "load_average_at_start": load_average(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info
