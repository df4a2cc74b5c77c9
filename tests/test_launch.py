"""`distrain launch` before and around torchrun's agent: GPUs per node, CPU oversubscription, a multi-node wait
that says what it waits for, and which failed worker is reported as the root cause."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from conftest import REPO, gpu_count, run_cli
from distrain.dist import check_gpus_per_node
from distrain.errors import ConfigError
from distrain.launch.torchrun import cpu_oversubscription, root_cause

QUICK = str(REPO / "configs" / "quickstart.yaml")


# --- more NCCL ranks than GPUs --------------------------------------------------------------------------------
@pytest.mark.parametrize("processes, gpus, backend, device", [
    (2, 2, "auto", "auto"), (1, 1, "nccl", "cuda"), (8, 8, "auto", "cuda"),  # one GPU each
    (4, 1, "gloo", "auto"), (4, 1, "gloo", "cuda"),  # gloo shares a GPU between processes
    (4, 0, "auto", "auto"), (4, 2, "auto", "cpu"),  # no GPU used at all
])
def test_ranks_that_fit_the_gpus_pass(processes, gpus, backend, device):
    check_gpus_per_node(processes, gpus, backend, device)


@pytest.mark.parametrize("processes, gpus, backend, device", [
    (2, 1, "auto", "auto"), (2, 1, "nccl", "cuda"), (3, 2, "auto", "cuda"), (2, 0, "auto", "cuda"),
])
def test_more_nccl_ranks_than_gpus_are_refused_in_one_paragraph(processes, gpus, backend, device):
    with pytest.raises(ConfigError) as err:
        check_gpus_per_node(processes, gpus, backend, device)
    message = str(err.value)
    assert f"{processes} process" in message
    assert (f"{gpus} visible GPU(s)" in message and "dist.backend=gloo" in message) if gpus else \
        "no CUDA device is visible" in message


def test_launch_refuses_cuda_ranks_without_gpus_before_starting_workers():
    proc = run_cli(["launch", "--nproc-per-node", "2", QUICK, "dist.device=cuda"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "2 process(es) on this node, but no CUDA device is visible" in " ".join(proc.stderr.split())
    assert "rank0" not in proc.stderr  # refused by the launcher, not by a worker


@pytest.mark.gpu
def test_launch_refuses_more_nccl_ranks_than_visible_gpus():
    gpus = gpu_count()
    proc = run_cli(["launch", "--nproc-per-node", str(gpus + 1), QUICK], gpu=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    flat = " ".join(proc.stderr.split())
    assert f"{gpus + 1} processes on this node would use NCCL, but it has {gpus} visible GPU(s)" in flat
    assert "Duplicate GPU" not in proc.stderr


def test_far_more_workers_than_cpu_cores_are_warned():
    cpus = len(os.sched_getaffinity(0))
    # train.global_batch=1 stops the launch at the config check, after the warning and before any worker.
    proc = run_cli(["launch", "--nproc-per-node", str(2 * cpus + 1), QUICK, "train.global_batch=1",
                    "train.micro_batch=null"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("distrain: warning:")]
    assert len(warnings) == 1 and f"on {cpus} CPU core(s)" in warnings[0], proc.stderr
    assert cpu_oversubscription(4, 2) is None
    assert "--nproc-per-node 5 starts 5 workers on 2 CPU core(s)" in cpu_oversubscription(5, 2)


# --- a multi-node launch whose other node never arrives ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_node_waiting_alone_says_so_shows_progress_and_ends_in_one_paragraph(tmp_path):
    """--nnodes 2 with only node 0 started: where it waits and for how long, then one paragraph, exit 1."""
    endpoint = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    proc = run_cli(["launch", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", endpoint, "--join-timeout", "3",
                    QUICK, f"run.dir={tmp_path}"], timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RendezvousTimeoutError" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert f"distrain launch: waiting for the other 1 node at the rendezvous {endpoint}, for up to 3 s " \
           f"(--join-timeout)" in lines
    assert any(line.startswith(f"distrain launch: still waiting for the other 1 node at {endpoint}: ")
               for line in lines), proc.stderr
    message = " ".join(proc.stderr[proc.stderr.index("distrain: error:"):].split())
    assert f"The rendezvous at {endpoint} did not complete within --join-timeout 3 s" in message
    assert "--nnodes 2" in message and not (tmp_path / "run").exists()
    print(f"waited alone for 3 s; the command took {elapsed:.1f} s")


# --- which failed worker is the root cause ---------------------------------------------------------------------
def _failure(tmp_path, rank: int, exitcode: int, message=None, timestamp: int = 0):
    """A real torchelastic ProcessFailure, with an error file when ``message`` is given."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error{rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": str(timestamp)}}}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_root_cause_skips_a_worker_the_agent_terminated(tmp_path):
    failures = {0: _failure(tmp_path, 0, -15),  # SIGTERMed while the agent tore the group down: no error file
                1: _failure(tmp_path, 1, 1, "ValueError: the real problem", timestamp=int(time.time()) + 5)}
    assert root_cause(failures)[0] == 1


def test_root_cause_prefers_a_failure_over_a_report_about_other_ranks(tmp_path):
    failures = {0: _failure(tmp_path, 0, 1, "DistributedError: Collective ALLREDUCE timed out", timestamp=100),
                1: _failure(tmp_path, 1, 1, "RuntimeError: CUDA out of memory", timestamp=101)}
    assert root_cause(failures)[0] == 1


def test_root_cause_among_equals_is_the_earliest(tmp_path):
    failures = {0: _failure(tmp_path, 0, 1, "RuntimeError: b", timestamp=200),
                1: _failure(tmp_path, 1, 1, "RuntimeError: a", timestamp=150),
                2: _failure(tmp_path, 2, 1, "RuntimeError: c", timestamp=300)}
    assert root_cause(failures)[0] == 1


def test_a_worker_killed_by_a_signal_with_an_error_file_still_counts(tmp_path):
    """SIGTERM after the worker wrote its own error (e.g. the watchdog's abort): it failed by itself."""
    failures = {0: _failure(tmp_path, 0, -15, "RuntimeError: stuck", timestamp=100),
                1: _failure(tmp_path, 1, 1, "RuntimeError: later", timestamp=101)}
    assert root_cause(failures)[0] == 0


def test_an_elastic_nnodes_range_is_checked_at_every_world_size_not_only_the_largest():
    """--nnodes 2:4 x 1 process: 2, 3 and 4 ranks. 64 samples in micro-batches of 16 split at 2 and 4 ranks but not
    at 3, which only the largest size's check missed (the job then waited for nodes instead)."""
    proc = run_cli(["launch", "--nnodes", "2:4", "--nproc-per-node", "1", "--rdzv-endpoint", "127.0.0.1:29999",
                    "--join-timeout", "5", QUICK, "train.micro_batch=16"], timeout=120)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "(2, 3, 4 ranks): it fails at 3" in message and "train.global_batch=192" in message
    assert "Traceback" not in proc.stderr
