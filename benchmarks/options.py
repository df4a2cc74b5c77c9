"""What a benchmark run was asked for, and what a suite hands back to the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


@dataclass
class Options:
    smoke: bool = False  # tiny rounds and steps: proves every suite still runs (the `bench` test marker)
    device: str = "cpu"  # cpu (gloo) | cuda (NCCL)
    nproc: int = 2  # ranks per job for the suites that compare at one world size
    threads_per_rank: int = 1  # OMP/intra-op threads per rank (2 ranks x 1 thread on a 2-core machine)
    rounds: Optional[int] = None  # override every suite's number of timed rounds
    timeout_s: float = 900.0  # per job

    def job_params(self, **params: Any) -> Dict[str, Any]:
        return {"device": self.device, "smoke": self.smoke, **params}

    def pick(self, full: int, smoke: int) -> int:
        """``smoke`` in a smoke run, else ``full``."""
        return smoke if self.smoke else full

    def timed_rounds(self, full: int, smoke: int) -> int:
        """Timed rounds: ``smoke`` in a smoke run, else the ``--rounds`` override, else ``full``."""
        if self.smoke:
            return smoke
        return self.rounds if self.rounds is not None else full


@dataclass
class Check:
    """One measured number against its target, for the summary table."""

    suite: str
    name: str
    value: float
    target: str  # e.g. "<= 1.02"
    met: bool
    note: str = ""


@dataclass
class Section:
    """A suite's part of BENCHMARKS.md."""

    title: str
    markdown: str
    checks: List[Check] = field(default_factory=list)
    plots: List[Path] = field(default_factory=list)


def check(suite: str, name: str, value: float, op: str, target: float, note: str = "") -> Check:
    """A Check with ``op`` one of <=, >=."""
    met = value <= target if op == "<=" else value >= target
    return Check(suite, name, value, f"{op} {target:g}", bool(met), note)
