"""`distrain doctor`: is this machine ready for distributed training, and what to do where it is not.

Every check is cheap: versions come from package metadata, DeepSpeed's op compatibility is its own
``is_compatible`` probe (what ``ds_report`` prints; it never JIT-builds an op), and the only real work is a
2-process gloo all_reduce, which measures the bandwidth the CPU path gets on this machine. The slow parts (the
DeepSpeed import, the spawned processes) run concurrently, so the whole report takes seconds.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from distrain.env import detect
from distrain.errors import ConfigError
from distrain.extras import install_hint
from distrain.ports import describe_owner, free_port, port_in_use
from distrain.version import __version__

SMOKE_SIZES = (64 * 1024, 4 * 2**20, 16 * 2**20)  # bytes per all_reduce: latency-bound to bandwidth-bound
SMOKE_ITERS = 5
SMOKE_TIMEOUT_S = 20.0
DEEPSPEED_TIMEOUT_S = 25.0
SHM_MIN_BYTES = 1 << 30
DISK_MIN_BYTES = 2 << 30


@dataclass
class Check:
    """One line of the report: ok | info | warn | fail, what was found, and what to do when it is not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> Dict[str, str]:
        return dict(vars(self))


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the slow probes, started first and collected last --------------------------------------------------------

_DEEPSPEED_PROBE = r"""
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", sys.argv[1])
import logging
logging.disable(logging.WARNING)
from deepspeed.env_report import ALL_OPS, probe_is_compatible, installed_ops, accelerator_name
from torch.utils.cpp_extension import is_ninja_available
ops = {name: {"compatible": bool(probe_is_compatible(builder, False)), "installed": bool(installed_ops.get(name))}
       for name, builder in ALL_OPS.items()}
print("DOCTOR-JSON " + json.dumps({"accelerator": accelerator_name, "ninja": is_ninja_available(), "ops": ops}))
"""


def _start_deepspeed_probe(cuda: bool) -> Optional[subprocess.Popen]:
    if _version("deepspeed") is None:
        return None
    return subprocess.Popen([sys.executable, "-c", _DEEPSPEED_PROBE, "cuda" if cuda else "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _allreduce_worker(rank: int, world: int, port: int, results: Any) -> None:
    """One rank of the smoke test: all_reduce a few sizes over gloo, check the sum, time it."""
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch  # lazy: start-up: torch takes seconds to import
        import torch.distributed as dist

        from distrain.dist import leave_process_group  # lazy: it imports torch (start-up, above)

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=SMOKE_TIMEOUT_S))
        timings = {}
        for size in SMOKE_SIZES:
            tensor = torch.full((size // 4,), float(rank + 1))
            dist.all_reduce(tensor)  # warm-up, and the correctness check: 1 + 2 + ... + world
            expected = world * (world + 1) / 2
            if not torch.all(tensor == expected):
                raise RuntimeError(f"all_reduce returned {tensor[0].item()} instead of {expected}")
            dist.barrier()
            start = time.perf_counter()
            for _ in range(SMOKE_ITERS):
                dist.all_reduce(tensor)
            timings[size] = (time.perf_counter() - start) / SMOKE_ITERS
        leave_process_group(wait_for_peers=True)  # as the Trainer leaves a group it owns (see there)
        results.put((rank, "ok", timings))
    except Exception as err:  # reported by the parent as the check's failure
        results.put((rank, "error", f"{type(err).__name__}: {err}"))


class _SmokeTest:
    """Two spawned processes on gloo over TCP loopback: a rendezvous, a checked all_reduce, and its bandwidth."""

    world = 2

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as torchrun's workers are
        self.results = ctx.Queue()
        self.port = free_port()
        self.started = time.perf_counter()
        self.procs = [ctx.Process(target=_allreduce_worker, args=(r, self.world, self.port, self.results),
                                  daemon=True) for r in range(self.world)]
        for proc in self.procs:
            proc.start()

    def collect(self) -> Check:
        outcomes: Dict[int, Any] = {}
        deadline = self.started + SMOKE_TIMEOUT_S + 10
        while len(outcomes) < self.world and time.perf_counter() < deadline:
            try:
                rank, status, payload = self.results.get(timeout=max(0.1, deadline - time.perf_counter()))
            except queue.Empty:
                break
            outcomes[rank] = (status, payload)
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
        fix = ("Check that 127.0.0.1 works and is not firewalled; on a multi-homed host set GLOO_SOCKET_IFNAME to "
               "the interface the nodes share (e.g. eth0); with containers, use host networking or open the ports.")
        if len(outcomes) < self.world:
            missing = sorted(set(range(self.world)) - set(outcomes))
            return Check("gloo all_reduce (2 processes)", "fail",
                         f"rank(s) {missing} did not finish within {SMOKE_TIMEOUT_S + 10:.0f} s "
                         f"(rendezvous on 127.0.0.1:{self.port})", fix)
        errors = [f"rank {r}: {p}" for r, (s, p) in sorted(outcomes.items()) if s != "ok"]
        if errors:
            return Check("gloo all_reduce (2 processes)", "fail", "; ".join(errors), fix)
        size = max(SMOKE_SIZES)
        seconds = max(outcomes[r][1][size] for r in outcomes)  # the slowest rank sets the pace
        algbw = size / seconds
        busbw = algbw * 2 * (self.world - 1) / self.world  # nccl-tests' bus bandwidth of a ring all_reduce
        latency = max(outcomes[r][1][min(SMOKE_SIZES)] for r in outcomes)
        self.bandwidth = busbw
        return Check("gloo all_reduce (2 processes)", "ok",
                     f"sum correct; {size / 2**20:.0f} MiB in {seconds * 1e3:.1f} ms = {busbw / 1e9:.2f} GB/s bus "
                     f"bandwidth; {min(SMOKE_SIZES) // 1024} KiB in {latency * 1e3:.2f} ms")


# --- the cheap checks ------------------------------------------------------------------------------------------

def _versions() -> List[Check]:
    import torch  # lazy: start-up: torch takes seconds to import


    cuda_build = torch.version.cuda or "none (CPU build)"
    checks = [Check("python", "ok", f"{platform.python_version()} ({sys.executable})"),
              Check("distrain", "ok", __version__),
              Check("torch", "ok", f"{torch.__version__}, CUDA build: {cuda_build}")]
    for package, why in (("deepspeed", "strategy.name=deepspeed"), ("accelerate", "strategy.name=accelerate")):
        version = _version(package)
        checks.append(Check(package, "ok", version) if version else
                      Check(package, "warn", "not installed", f"pip install {package} (needed for {why} only)"))
    for package, why, extra in (("tensorboard", "metrics.trackers: [tensorboard]", "tensorboard"),
                                ("mlflow", "metrics.trackers: [mlflow]", "mlflow"),
                                ("wandb", "metrics.trackers: [wandb]", "wandb"),
                                ("ray", "distrain ray", "ray"), ("matplotlib", "distrain plot", "viz")):
        version = _version(package)
        checks.append(Check(package, "ok", version) if version else
                      Check(package, "info", "not installed", f"{install_hint(package)} (for {why})"))
    return checks


def _backends(cuda_devices: int) -> List[Check]:
    import torch.distributed as dist  # lazy: start-up: torch takes seconds to import

    if not dist.is_available():
        return [Check("torch.distributed", "fail", "this torch build has no torch.distributed",
                      "Install a regular torch wheel from pytorch.org (some mobile/minimal builds omit it).")]
    checks = [Check("backend gloo", "ok" if dist.is_gloo_available() else "fail",
                    "available" if dist.is_gloo_available() else "missing",
                    "" if dist.is_gloo_available() else "gloo is the CPU backend; install a regular torch wheel.")]
    nccl = dist.is_nccl_available()
    if cuda_devices:
        checks.append(Check("backend nccl", "ok" if nccl else "fail", "available" if nccl else "missing",
                            "" if nccl else "GPU training needs NCCL: install a CUDA build of torch from pytorch.org."))
    else:
        checks.append(Check("backend nccl", "info", "available" if nccl else "not in this build (CPU-only torch)"))
    mpi = dist.is_mpi_available()
    checks.append(Check("backend mpi", "info", "available" if mpi else "not in this build (distrain does not need it)"))
    return checks


def _cuda() -> List[Check]:
    import torch  # lazy: start-up: torch takes seconds to import

    if not torch.cuda.is_available():
        gpu_present = shutil.which("nvidia-smi") is not None
        if gpu_present and torch.version.cuda is None:
            return [Check("CUDA devices", "warn", "nvidia-smi is here but this torch is a CPU build",
                          "Install a CUDA build: pip install torch --index-url https://download.pytorch.org/whl/cu128 "
                          "(then reinstall distrain without -c constraints.txt).")]
        if gpu_present:
            return [Check("CUDA devices", "warn", "nvidia-smi is here but torch sees no GPU",
                          "Check the driver (nvidia-smi), CUDA_VISIBLE_DEVICES, and that the driver supports torch's "
                          f"CUDA {torch.version.cuda}.")]
        return [Check("CUDA devices", "info", "none: training runs on the CPU with gloo (dist.device=auto)")]
    checks = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        checks.append(Check(f"cuda:{i}", "ok", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute "
                                               f"capability {props.major}.{props.minor}, bf16 "
                                               f"{'yes' if props.major >= 8 else 'no (use fp16 or fp32)'}"))
    return checks


def _deepspeed(proc: Optional[subprocess.Popen]) -> List[Check]:
    if proc is None:
        return []
    try:
        out, err = proc.communicate(timeout=DEEPSPEED_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [Check("deepspeed ops", "warn", f"the op probe did not finish within {DEEPSPEED_TIMEOUT_S:.0f} s",
                      "Run `ds_report` to see DeepSpeed's own report.")]
    line = next((l for l in out.splitlines() if l.startswith("DOCTOR-JSON ")), None)
    if proc.returncode != 0 or line is None:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return [Check("deepspeed ops", "fail", f"importing deepspeed failed: {last}",
                      "Reinstall deepspeed against this torch (pip install --force-reinstall deepspeed); "
                      "on a CPU machine DS_ACCELERATOR=cpu is set by distrain itself.")]
    report = json.loads(line.split(" ", 1)[1])
    ops = report["ops"]
    compatible = sorted(n for n, o in ops.items() if o["compatible"])
    prebuilt = sorted(n for n, o in ops.items() if o["installed"])
    incompatible = sorted(n for n, o in ops.items() if not o["compatible"])
    checks = [Check("deepspeed ops", "ok",
                    f"accelerator {report['accelerator']}; JIT-compatible: {', '.join(compatible) or 'none'}; "
                    f"prebuilt: {', '.join(prebuilt) or 'none (built on first use)'}"
                    + (f"; not compatible: {', '.join(incompatible)}" if incompatible else ""))]
    if not report["ninja"] or shutil.which(os.environ.get("CXX", "c++")) is None:
        checks.append(Check("deepspeed JIT build", "warn",
                            f"ninja {'found' if report['ninja'] else 'missing'}, C++ compiler "
                            f"{'found' if shutil.which(os.environ.get('CXX', 'c++')) else 'missing'}",
                            "DeepSpeed compiles ops (e.g. cpu_adam for offload) on first use: pip install ninja and "
                            "install a C++ compiler (apt install g++), or use prebuilt ops (DS_BUILD_OPS=1 pip "
                            "install deepspeed)."))
    if "async_io" in incompatible:
        checks.append(Check("deepspeed async_io", "info", "not compatible (libaio missing)",
                            "Only NVMe offload needs it: apt install libaio-dev."))
    return checks


def _launch_environment() -> List[Check]:
    checks = []
    try:
        info = detect()
        where = "a single process" if info.source == "single" else f"rank {info.rank} of {info.world_size} ({info.source})"
        checks.append(Check("launcher environment", "ok", f"this shell looks like {where}"))
    except ConfigError as err:
        checks.append(Check("launcher environment", "fail", str(err),
                            "Unset the stray variables (e.g. `unset RANK WORLD_SIZE`) or start the job with "
                            "torchrun/srun, which set them all."))
    srun = shutil.which("srun")
    in_job = os.environ.get("SLURM_JOB_ID")
    detail = f"srun at {srun}" if srun else "no srun on PATH (not a SLURM login/compute node)"
    if in_job:
        detail += f"; inside job {in_job} on {os.environ.get('SLURM_JOB_NODELIST', '?')}"
    checks.append(Check("SLURM", "ok" if srun else "info", detail))
    return checks


def _ports() -> List[Check]:
    checks = []
    wanted = {29500: "torchrun's default MASTER_PORT / rendezvous port"}
    if os.environ.get("MASTER_PORT", "").isdigit():
        wanted[int(os.environ["MASTER_PORT"])] = "MASTER_PORT from the environment"
    for port, role in wanted.items():
        if port_in_use(port):
            checks.append(Check(f"port {port}", "warn", f"in use by {describe_owner(port)} ({role})",
                                f"Pick another port: --rdzv-endpoint HOST:PORT or MASTER_PORT=<port> (e.g. "
                                f"{free_port()}, free now); `distrain launch --nproc-per-node N` on one node picks "
                                f"a free one itself."))
        else:
            checks.append(Check(f"port {port}", "ok", f"free ({role})"))
    return checks


def _shm_and_disk() -> List[Check]:
    checks = []
    try:
        stat = os.statvfs("/dev/shm")
        total, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
        if total < SHM_MIN_BYTES:
            checks.append(Check("/dev/shm", "warn", f"{total / 2**20:.0f} MiB ({free / 2**20:.0f} MiB free)",
                                "NCCL and data-loader workers share memory through /dev/shm; Docker's default is "
                                "64 MiB. Run containers with --shm-size=8g or --ipc=host (compose: shm_size: 8gb)."))
        else:
            checks.append(Check("/dev/shm", "ok", f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"))
    except OSError:
        checks.append(Check("/dev/shm", "info", "not present (not Linux); gloo on one machine does not need it"))
    here = os.getcwd()
    free_disk = shutil.disk_usage(here).free
    checks.append(Check("disk", "ok" if free_disk >= DISK_MIN_BYTES else "warn",
                        f"{free_disk / 2**30:.1f} GiB free in {here} (runs and checkpoints go to run.dir)",
                        "" if free_disk >= DISK_MIN_BYTES else
                        "Checkpoints need room: free space, or point run.dir at a larger disk."))
    return checks


def _cpu() -> List[Check]:
    import torch  # lazy: start-up: torch takes seconds to import

    threads = os.environ.get("OMP_NUM_THREADS")
    return [Check("CPU", "ok", f"{os.cpu_count()} cores; torch uses {torch.get_num_threads()} threads"
                                + (f" (OMP_NUM_THREADS={threads})" if threads else "")
                                + "; `distrain launch` shares the cores between its workers")]


def run_checks(smoke_test: bool = True) -> List[Check]:
    """Run every check; slow probes (DeepSpeed ops, the 2-process all_reduce) overlap with the cheap ones."""
    import torch  # lazy: start-up: torch takes seconds to import

    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    smoke = _SmokeTest() if smoke_test else None
    deepspeed_probe = _start_deepspeed_probe(cuda_devices > 0)
    checks = _versions() + _backends(cuda_devices) + _cuda() + _cpu() + _launch_environment() + _ports() \
        + _shm_and_disk()
    checks += _deepspeed(deepspeed_probe)
    if smoke is not None:
        checks.append(smoke.collect())
    return checks


STATUS_MARK = {"ok": "ok  ", "info": "info", "warn": "WARN", "fail": "FAIL"}


def format_report(checks: List[Check]) -> str:
    """The human report: one line per check, the fix indented under every warning and failure."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"[{STATUS_MARK[c.status]}] {c.name.ljust(width)}  {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"       {' ' * width}  -> {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in STATUS_MARK}
    lines.append(f"distrain doctor: {counts['ok']} ok, {counts['info']} info, {counts['warn']} warning(s), "
                 f"{counts['fail']} problem(s)")
    return "\n".join(lines)
