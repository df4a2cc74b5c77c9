"""Divergence: infinite hyper-parameters are refused, a non-finite loss stops / skips / warns (train.on_nonfinite),
non-finite weights are never committed, and run.json stays strict JSON that says failed.

End to end: `train.lr=1e6 checkpoint.every=5` exits 1 naming the step and leaves a finite latest checkpoint. The
agreement of every rank on a step one rank found non-finite is in test_checkpoint_hashing.py (one 2-rank launch).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from distrain.checkpoint.export import read_checkpoint_weights
from distrain.checkpoint.paths import committed, read_latest
from distrain.config import load_config
from distrain.config.validation import FLOAT_KEYS
from distrain.errors import ConfigError, DivergenceError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is (disabled, )?unavailable")

MLP = str(REPO / "configs" / "mlp.yaml")
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FLOATS = ["train.lr", "train.eps", "train.weight_decay", "train.momentum", "train.min_lr_ratio", "train.grad_clip",
          "data.eval_fraction", "dist.timeout_s", "checkpoint.every_minutes", "metrics.peak_flops", "run.lock_grace_s",
          "metrics.tracker_timeout_s", "train.prune.amount", "metrics.straggler_factor"]


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not strict JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_infinite_or_nan_hyper_parameters_are_refused(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(MLP, [f"{key}={value}"])
    assert info.value.key == key and "finite" in str(info.value)


def test_every_float_key_is_covered_and_lists_are_checked_too():
    assert set(FLOAT_KEYS) == set(FLOATS) | {"train.betas"}  # a new float knob gets its row above
    with pytest.raises(ConfigError, match="finite") as info:
        load_config(MLP, ["train.betas=[0.9,inf]"])
    assert info.value.key == "train.betas"


def test_lr_1e6_stops_naming_the_step_and_leaves_a_finite_latest_checkpoint(tmp_path):
    """The issue's run: it used to train to NaN, exit 0, mark itself finished, write NaN into run.json, and let
    retention replace the finite checkpoints with NaN ones. (A long warmup makes it diverge after a few saves.)"""
    run_dir, root = tmp_path / "div", tmp_path / "div" / "checkpoints"
    proc = run_cli(["train", QUICKSTART, f"run.dir={tmp_path}", "run.name=div", "train.lr=1e6",
                    "train.warmup_steps=24000", "checkpoint.every=5", "train.steps=40", "train.log_every=1",
                    "train.eval_every=0", "metrics.progress=none", "strategy.name=single"], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())  # one paragraph, wrapped
    match = re.search(r"Training diverged at step (\d+): the (loss|gradient norm) is not finite", message)
    assert match and "Traceback" not in message, message
    step = int(match.group(1))
    logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert logged == list(range(1, step + 1))  # stopped at once: the check of step N is read during step N + 1

    latest = read_latest(root)
    saved = [s for s, _ in committed(root)]
    assert saved and latest == f"step_{saved[-1]:08d}" and saved[-1] < step
    for _, path in committed(root):
        weights, _ = read_checkpoint_weights(path)
        assert all(torch.isfinite(w).all() for w in weights.values()), f"{path.name} holds non-finite weights"
    assert f"The latest checkpoint, {root / latest}, holds finite weights" in message

    record = _strict_json((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and f"step {step}" in record["error"]


def _nan_on_calls(calls: List[int]):
    """A loss function whose n-th call (1-based) returns nan: a diverged micro-batch at a known step."""
    count = {"n": 0}

    def loss_fn(output, target):
        count["n"] += 1
        loss = F.cross_entropy(output, target)
        return loss * float("nan") if count["n"] in calls else loss
    return loss_fn


def _fast(tmp_path: Path, name: str, *extra: str) -> List[str]:
    return [f"run.dir={tmp_path}", f"run.name={name}", "strategy.name=single", "metrics.progress=none",
            "train.eval_every=0", "data.eval_fraction=0", "train.optimizer=adamw", "train.lr=0.003", *extra]


def test_skip_step_drops_the_update_and_training_goes_on(tmp_path):
    from distrain.training.trainer import Trainer

    # mlp.yaml in one process: 2 micro-batches per step, so calls 5 and 6 are step 3.
    with Trainer(MLP, loss_fn=_nan_on_calls([5]),
                 overrides=_fast(tmp_path, "skip", "train.steps=6", "train.on_nonfinite=skip_step")) as trainer:
        before = None
        original = trainer.train_step

        def spy(step: int):
            nonlocal before
            if step == 2:  # the 0-based index of step 3
                before = {k: v.clone() for k, v in trainer.full_state_dict().items()}
            out = original(step)
            if step == 2:
                after = trainer.full_state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before), "step 3's update was applied"
            return out
        trainer.train_step = spy
        trainer.fit()
        assert all(torch.isfinite(v).all() for v in trainer.full_state_dict().values())
    record = _strict_json((tmp_path / "skip" / "run.json").read_text())
    assert record["status"] == "finished" and record["nonfinite_steps"] == 1
    log = (tmp_path / "skip" / "logs" / "rank0.log").read_text()
    assert "step 3: the loss is not finite (nan or inf) on rank(s) 0; skipped its update" in log
    assert read_latest(tmp_path / "skip" / "checkpoints") == "step_00000006"


def test_warn_goes_on_but_never_commits_non_finite_weights(tmp_path):
    from distrain.training.trainer import Trainer

    overrides = _fast(tmp_path, "warn", "train.steps=6", "checkpoint.every=2", "train.on_nonfinite=warn")
    with Trainer(MLP, loss_fn=_nan_on_calls([5]), overrides=overrides) as trainer:
        with pytest.raises(DivergenceError, match="Not saving checkpoint step 6: the weights are not finite"):
            trainer.fit()  # steps 4 and 6 are not saved (a warning each); the end of training cannot save: failed
    root = tmp_path / "warn" / "checkpoints"
    assert [s for s, _ in committed(root)] == [2] and read_latest(root) == "step_00000002"
    log = (tmp_path / "warn" / "logs" / "rank0.log").read_text()
    assert "step 3: the loss is not finite" in log and "going on (train.on_nonfinite=warn)" in log
    assert "Not saving checkpoint step 4" in log and "Training goes on (train.on_nonfinite=warn)" in log
    record = _strict_json((tmp_path / "warn" / "run.json").read_text())
    assert record["status"] == "failed"
    assert all(r["loss"] is None or math.isfinite(r["loss"])
               for r in map(_strict_json, (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()))


def test_skip_step_is_refused_where_the_engine_owns_the_step(tmp_path):
    from distrain.strategies.deepspeed_engine import DeepSpeedStrategy
    from distrain.training.divergence import DivergenceGuard

    engine = SimpleNamespace(name="deepspeed", opaque_step=DeepSpeedStrategy.opaque_step)
    with pytest.raises(ConfigError, match="cannot be honoured by strategy 'deepspeed'") as info:
        DivergenceGuard("skip_step", engine, torch.device("cpu"), "fp32", tmp_path, logging.getLogger("test"))
    assert info.value.key == "train.on_nonfinite"
    DivergenceGuard("stop", engine, torch.device("cpu"), "fp32", tmp_path, logging.getLogger("test"))
