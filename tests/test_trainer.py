"""Trainer's own promises outside the loop: a failed start releases what it acquired, eval batches cover every
sample once, and settings that are allowed but surprising get a warning line."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch.distributed as torch_dist

from conftest import REPO, run_torchrun
from distrain.errors import CheckpointError, ConfigError
from distrain.training.evaluation import eval_batches
from distrain.training.trainer import Trainer

QUICK = str(REPO / "configs" / "quickstart.yaml")
GPT = str(REPO / "configs" / "gpt.yaml")


# --- a failed __init__ releases everything -------------------------------------------------------------------
@pytest.mark.parametrize("overrides, error", [
    (["train.resume=/nonexistent", "checkpoint.async_save=true"], CheckpointError),  # after the checkpointer
    (["train.global_batch=4096", "train.micro_batch=null"], ConfigError),  # a data check
    (["model.kwargs.hidden=-5"], ConfigError),  # the model builder
], ids=["refused-resume", "data-check", "model-build"])
def test_a_failed_init_releases_the_process_group_and_the_log_file(tmp_path, overrides, error):
    """Trainer creates a one-rank group for a single process; whatever fails after it, nothing stays behind."""
    with pytest.raises(error):
        Trainer(QUICK, overrides=[f"run.dir={tmp_path}", "metrics.progress=none", *overrides])
    assert not torch_dist.is_initialized()
    assert distrain_handlers() == []


def distrain_handlers() -> list:
    """The log file and console handlers setup_logging adds (pytest attaches its own capture handlers too)."""
    return [h for h in logging.getLogger("distrain").handlers if type(h) in (logging.FileHandler, logging.StreamHandler)]


def test_a_failed_init_releases_the_deepspeed_engine(tmp_path):
    """A resume refused after DeepSpeed started: its engine is torn down (and the LOCAL_RANK it needed removed)."""
    with pytest.raises(CheckpointError):
        Trainer(GPT, overrides=[f"run.dir={tmp_path}", "metrics.progress=none", "strategy.name=deepspeed",
                                "data.kwargs.max_chars=20000", "train.resume=/nonexistent"])
    assert not torch_dist.is_initialized() and "LOCAL_RANK" not in os.environ


def test_a_failed_init_in_a_2_rank_job_leaves_no_group_and_faults_close_their_group(tmp_path):
    proc = run_torchrun(2, ["tests/workers/release_worker.py", QUICK, str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["checks"] == {"init_refused": True, "groups_left_by_failed_init": 0, "log_handlers_left": 0,
                                    "faults_groups_made": 1, "faults_groups_left": 0}, report


def test_a_failed_build_leaves_no_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="'model.kwargs.hidden' has value -5"):
        Trainer(QUICK, overrides=[f"run.dir={tmp_path}", "run.name=neg", "model.kwargs.hidden=-5"])
    assert not (tmp_path / "neg").exists()


# --- evaluation batches ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, world, size", [(10, 1, 4), (10, 3, 2), (7, 4, 3), (5, 8, 2), (256, 2, 256)])
def test_eval_batches_cover_every_sample_once_with_as_many_batches_on_every_rank(n, world, size):
    shares = [eval_batches(n, rank, world, size) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of forwards
    counted = sorted(i for share in shares for indices, weight in share if weight for i in indices)
    assert counted == list(range(n))
    assert all(len(indices) <= size for share in shares for indices, _ in share)
    assert all(weight == 0 and indices == [0] for share in shares for indices, weight in share if not weight)


def test_eval_batches_split_contiguously():
    assert eval_batches(10, 1, 3, 2) == [([4, 5], 1), ([6, 7], 1)]
    assert eval_batches(10, 2, 3, 2) == [([8, 9], 1), ([0], 0)]  # 2 of the 4 samples a rank may hold: padded


# --- surprising settings get a warning line ------------------------------------------------------------------
def test_warmup_longer_than_training_and_eval_every_without_eval_data_are_warned(tmp_path, capsys):
    """One line each on stderr, even with metrics.progress=none (which silences the progress, not warnings)."""
    with Trainer(QUICK, overrides=[f"run.dir={tmp_path}", "metrics.progress=none", "train.steps=2",
                                   "train.warmup_steps=10", "train.eval_every=1", "data.eval_fraction=0"]):
        pass
    err = capsys.readouterr().err
    assert "[distrain] warning: train.warmup_steps=10 is more than train.steps=2" in err
    assert "[distrain] warning: train.eval_every=1, but there is no eval data" in err
    assert len([line for line in err.splitlines() if "warning:" in line]) == 2


@pytest.mark.gpu
def test_a_refused_start_on_nccl_leaves_no_unreleased_group_warning(tmp_path):
    """On NCCL torch warns at exit about a process group nobody destroyed; a refused resume must not leave one."""
    from conftest import run_cli

    proc = run_cli(["train", QUICK, f"run.dir={tmp_path}", "train.resume=/nonexistent"], gpu=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "destroy_process_group" not in proc.stderr and "Traceback" not in proc.stderr
