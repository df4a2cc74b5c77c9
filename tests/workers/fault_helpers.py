"""Test-only fault injection: a DDP strategy that sleeps, stalls or kills itself at a chosen step, on cue.

Loaded by real workers as ``strategy.name=fault_helpers:FaultDDP`` (with ``tests/workers/`` on PYTHONPATH, as
``conftest.child_env`` puts it), so the production loop, launcher and SLURM scripts run unchanged. Cues come from
environment variables, because `distrain launch`, torchrun, sbatch and srun all pass the environment through to
every worker:

    DISTRAIN_TEST_STEP_DELAY=S       sleep S seconds in every step (so a signal lands mid-run)
    DISTRAIN_TEST_SLOW=FILE:S        sleep S more seconds in every step while FILE exists (a test holds a job back
                                     while it waits for something slower than the job, e.g. a node to come back)
    DISTRAIN_TEST_STALL=RANK:STEP    rank RANK sleeps forever inside step STEP (1-based)
    DISTRAIN_TEST_KILL=RANK:STEP     rank RANK kills itself with SIGKILL inside step STEP (kill -9)
    DISTRAIN_TEST_OUT=DIR            rank 0 writes DIR/weights-stepN.safetensors at teardown (N = steps done);
                                     every rank writes DIR/pid.rankR at setup
    DISTRAIN_TEST_ONCE=FILE          stall and kill fire only while FILE does not exist, and create it (for
                                     launchers with no restart counter in the environment, such as Ray Train)

Stall and kill fire on the first attempt only (no TORCHELASTIC/SLURM restart yet), so a restarted group runs
through. The step in progress is read from the optimizer's own step counter (Adam/AdamW keep one, and it is
restored with the checkpoint), because a strategy is not told the step number before the update.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence, Tuple

from torch import nn

from distrain.strategies.ddp import DDPStrategy

DELAY_ENV = "DISTRAIN_TEST_STEP_DELAY"
STALL_ENV = "DISTRAIN_TEST_STALL"
KILL_ENV = "DISTRAIN_TEST_KILL"
OUT_ENV = "DISTRAIN_TEST_OUT"
SLOW_ENV = "DISTRAIN_TEST_SLOW"


def _cue(name: str) -> Optional[Tuple[int, int]]:
    value = os.environ.get(name)
    if not value:
        return None
    rank, _, step = value.partition(":")
    return int(rank), int(step)


ONCE_ENV = "DISTRAIN_TEST_ONCE"


def first_attempt() -> bool:
    if os.environ.get(ONCE_ENV):
        return not Path(os.environ[ONCE_ENV]).exists()
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0
            and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0)


class FaultDDP(DDPStrategy):
    name = "fault-ddp"

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        out = os.environ.get(OUT_ENV)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"pid.rank{self.ctx.info.rank}").write_text(str(os.getpid()))

    def steps_done(self) -> int:
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        self._inject(self.steps_done() + 1)
        return super().accumulate(last_micro_step)

    def _inject(self, step: int) -> None:
        delay = float(os.environ.get(DELAY_ENV) or 0)
        if delay:
            time.sleep(delay)
        slow_file, _, slow_s = (os.environ.get(SLOW_ENV) or "").rpartition(":")
        if slow_file and Path(slow_file).exists():
            time.sleep(float(slow_s))
        rank = self.ctx.info.rank
        if _cue(STALL_ENV) == (rank, step) and first_attempt():
            _fired()
            while True:  # "sleeps forever inside a step": only the watchdog and the launcher can end this
                time.sleep(3600)
        if _cue(KILL_ENV) == (rank, step) and first_attempt():
            _fired()
            os.kill(os.getpid(), signal.SIGKILL)

    def teardown(self) -> None:
        out = os.environ.get(OUT_ENV)
        if out and self.ctx.info.rank == 0:
            from safetensors.torch import save_file

            weights = {k: v.contiguous() for k, v in self.full_state_dict().items()}
            save_file(weights, str(Path(out) / f"weights-step{self.steps_done()}.safetensors"))
        super().teardown()


def _fired() -> None:
    if os.environ.get(ONCE_ENV):
        Path(os.environ[ONCE_ENV]).touch()


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest per-tensor max|a-b| / max|a| between two state dicts with the same keys."""
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))}"
    worst = 0.0
    for key, ref in a.items():
        ref, other = ref.double(), b[key].double()
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (other - ref).abs().max().item() / scale)
    return worst


# --- the test process's side: launch jobs, watch their progress, check nothing is left behind ----------------
REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
STEPS = 20
# The quickstart, shortened: numerics are the quickstart's; logs every step so a test can watch progress.
FAST = [f"train.steps={STEPS}", "train.eval_every=0", "train.log_every=1", "metrics.progress=none",
        "strategy.name=fault_helpers:FaultDDP"]


def worker_env(out: Path, **extra: str) -> dict:
    """Environment for a job whose workers load this module (tests/workers/ on PYTHONPATH) and write to ``out``."""
    from conftest import child_env

    env = child_env({OUT_ENV: str(out)})
    env.update(extra)
    return env


def launch_command(nproc: int, run_dir: Path, overrides=(), launch_args=()) -> list:
    return [PYTHON, "-m", "distrain", "launch", "--nproc-per-node", str(nproc), *launch_args, QUICKSTART,
            *FAST, f"run.dir={run_dir}", *overrides]


def steps_logged(run_dir: Path, name: str = "quickstart") -> int:
    """The newest step rank 0 has written to metrics.jsonl (0 before the first)."""
    path = run_dir / name / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def wait_until(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def load_weights(out: Path, step: int) -> dict:
    from safetensors.torch import load_file

    path = out / f"weights-step{step}.safetensors"
    assert path.exists(), f"no final weights at {path}: {sorted(p.name for p in out.iterdir())}"
    return load_file(str(path))


def reference_weights(root: Path, overrides: Sequence[str] = ()) -> dict:
    """Final weights of an uninterrupted 2-worker run of FAST (plain `distrain launch` on this machine, files under
    ``root``): the reference that the multi-node, SLURM, Kubernetes-pod and Ray runs must end on."""
    proc = subprocess.run(launch_command(2, root / "runs", overrides), env=worker_env(root / "out"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_weights(root / "out", STEPS)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_mentioning(text: str) -> list:
    """PIDs of live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def run_json(run_dir: Path, name: str = "quickstart") -> dict:
    return json.loads((run_dir / name / "run.json").read_text())
