"""What a run reports: metrics.jsonl, TensorBoard, the console view, grad norm, step-time split, memory, MFU."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

from conftest import REPO, child_env, read_jsonl, run_cli
from distrain.data import build_datasets
from distrain.telemetry.flops import flops_per_sample, lookup_peak, peak_flops
from distrain.models import build_model

# 32 samples per step, micro-batch 8: grad_accum 4 at W=1 and 2 at W=2, so the step time can be split.
SMALL = ["configs/mlp.yaml", "train.steps=6", "train.log_every=2", "train.global_batch=32", "train.micro_batch=8",
         "train.eval_every=0", "checkpoint.at_end=false"]


def _count(model, sample):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(sample)
    return 3 * counter.get_total_flops()


@pytest.mark.parametrize("name, data, kwargs", [("mlp", "digits", {"hidden": 32, "depth": 3}),
                                                 ("cnn", "digits", {"channels": 8})])
def test_vision_flop_formulas_match_torchs_counter(name, data, kwargs):
    train, _ = build_datasets(data, {}, 0.2)
    model = build_model(name, kwargs, train.spec)
    estimate = flops_per_sample(model, train.spec, builtin=name)
    assert estimate.per_sample == _count(model, train[0][0].unsqueeze(0))
    assert "formula" in estimate.method


def test_lstm_and_gpt_flop_formulas():
    from distrain.models.language import flops_per_token

    train, _ = build_datasets("text", {"block_size": 32, "max_chars": 20000}, 0.2)
    lstm = build_model("lstm", {"embed": 16, "hidden": 24, "layers": 2}, train.spec)
    # On the meta device torch decomposes nn.LSTM into the matmuls the counter sees (the CPU kernel is fused).
    meta = lstm.to("meta")
    counted = _count(meta, torch.zeros(1, 32, dtype=torch.long, device="meta"))
    assert flops_per_sample(lstm, train.spec, builtin="lstm").per_sample == pytest.approx(counted, rel=1e-3)
    gpt = build_model("gpt", {"embed": 32, "heads": 2, "layers": 1}, train.spec)
    assert flops_per_sample(gpt, train.spec, builtin="gpt").per_sample == flops_per_token(gpt) * 32


def test_user_model_flops_are_counted_on_one_sample():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    estimate = flops_per_sample(model, None, sample=torch.randn(1, 10))
    assert estimate.per_sample == 6 * (10 * 20 + 20 * 3)
    assert flops_per_sample(torch.nn.Tanh(), None, sample=torch.randn(1, 10)).per_sample is None


def test_peak_flops_table_and_config():
    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert lookup_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert lookup_peak("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    assert lookup_peak("Tesla T4", "bf16") is None  # no bf16 tensor cores
    assert lookup_peak("NVIDIA GeForce GTX 1080", "fp32") is None
    cpu = peak_flops(torch.device("cpu"), "fp32")
    assert cpu.value is None and "metrics.peak_flops" in cpu.source
    assert peak_flops(torch.device("cpu"), "fp32", configured=2e12).value == 2e12


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process (strategy single), TensorBoard on, a configured peak so MFU is reported."""
    out = tmp_path_factory.mktemp("ref")
    proc = run_cli(["train", *SMALL, "strategy.name=single", "metrics.tensorboard=true", "metrics.peak_flops=1e12",
                    "run.name=w1", f"run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "w1"


def _steps(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_jsonl_holds_every_metric(reference_run):
    records = _steps(reference_run)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["grad_norm"] > 0  # logged although train.grad_clip=0
        assert r["comm_s"] == 0.0 and r["compute_s"] > 0  # one process: nothing to communicate
        assert r["flops_per_s"] == pytest.approx(r["samples_per_s"] * 6 * (64 * 128 + 128 * 128 + 128 * 10))
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
        assert r["peak_mem_mb"] > 50 and r["peak_mem_mb_ranks"] == [r["peak_mem_mb"]]


def test_tensorboard_event_files_hold_the_logged_scalars(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(reference_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "samples_per_s", "compute_s", "comm_s", "flops_per_s", "mfu",
            "peak_mem_mb", "eval_loss", "eval_accuracy"} <= tags, tags
    records = _steps(reference_run)
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in records]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.value for e in acc.Scalars("grad_norm")] == pytest.approx([r["grad_norm"] for r in records], rel=1e-6)
    assert acc.Scalars("peak_mem_mb_ranks/rank0")[-1].value == pytest.approx(records[-1]["peak_mem_mb"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_report_the_same_grad_norm_and_split_the_step(strategy, reference_run, tmp_path):
    proc = run_cli(["launch", "--nproc-per-node", "2", *SMALL, f"strategy.name={strategy}", "run.name=w2",
                    f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, records = _steps(reference_run), _steps(tmp_path / "w2")
    # The norm of the synchronised (for FSDP: sharded, DTensor) gradient equals the one-process gradient's.
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5)
    for r in records:
        assert len(r["peak_mem_mb_ranks"]) == 2 and min(r["peak_mem_mb_ranks"]) > 50
        assert r["comm_s"] >= 0 and r["compute_s"] > 0  # grad_accum 2 per rank: the sync micro-step vs the others
        assert r["mfu"] is None and r["flops_per_s"] > 0  # CPU: no known peak, achieved FLOP/s only


def _run_on_a_terminal(args, cols=120, timeout=240):
    """Run `python -m distrain ARGS` with stdin/stdout/stderr on a pseudo-terminal; returns (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "distrain", *args], cwd=REPO, stdin=slave, stdout=slave,
                            stderr=slave, env=child_env(), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_plain_lines_in_a_log_file(tmp_path):
    args = ["train", "configs/gpt.yaml", "train.steps=8", "train.log_every=4", "train.eval_every=0",
            "data.kwargs.max_chars=40000", "model.kwargs.layers=1", "strategy.name=single",
            "checkpoint.at_end=false", f"run.dir={tmp_path}"]
    code, screen = _run_on_a_terminal(args)
    assert code == 0, screen[-3000:]
    frames = [f for f in screen.replace("\r\n", "\r").split("\r") if "gpt-text" in f and "|" in f]
    assert frames, screen[-2000:]
    last = frames[-1]
    assert "8/8" in last and "100%" in last and "loss=" in last and "lr=" in last and "tok/s=" in last
    assert "<00:00" in last  # tqdm's ETA
    assert "step 4/8" not in screen  # no plain lines on a terminal

    piped = run_cli(args + ["run.name=piped"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    lines = [line for line in piped.stderr.splitlines() if " step " in f" {line}" and "/8 loss" in line]
    assert len(lines) == 2 and "step 8/8" in lines[-1] and "tok/s" in lines[-1] and "eta" in lines[-1]
    record = _steps(tmp_path / "piped")[-1]
    assert record["tokens_per_s"] == pytest.approx(record["samples_per_s"] * 64)


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_a_resume_after_a_crash_leaves_one_record_per_step(tmp_path):
    """kill -9 of rank 1 in step 9 (steps 6-8 logged after the checkpoint at step 5), a restart of the group resumes
    from step 5 and logs 6-8 again: metrics.jsonl, and `distrain runs` / `distrain plot` reading it, hold one record
    per step (the attempt that continued); the abandoned attempt's steps are kept aside, not lost."""
    from fault_helpers import KILL_ENV, launch_command, worker_env
    from distrain.tools.runs import read_run

    run_dir = tmp_path / "runs" / "quickstart"
    proc = subprocess.run(launch_command(2, tmp_path / "runs", ["checkpoint.every=5", "train.steps=12"],
                                         ["--max-restarts", "1"]),
                          env=worker_env(tmp_path / "out", **{KILL_ENV: "1:9"}), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_run(run_dir).steps]
    assert steps == list(range(1, 13)), steps  # once each, in order
    abandoned = list(run_dir.glob("metrics.abandoned.*.jsonl"))
    assert len(abandoned) == 1, sorted(p.name for p in run_dir.iterdir())
    assert [r["step"] for r in read_jsonl(abandoned[0]) if "loss" in r] == [6, 7, 8]
