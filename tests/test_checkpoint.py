"""Checkpoints on disk: atomic layout, corruption detection and fallback, retention, config-change refusal, the CLI.

Single-process runs (strategy single) in this process keep these fast; multi-rank behaviour (resharding, a save
killed mid-write) is in test_resume.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch

from conftest import REPO, run_cli_here
from distrain.checkpoint.paths import committed, read_latest, step_name
from distrain.checkpoint.manifest import problem
from distrain.checkpoint.retention import steps_to_keep
from distrain.config import load_config
from distrain.errors import CheckpointError
from distrain.training.trainer import Trainer

# DCP warns on every single-process save/load (strategy single), even when asked for one explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is (disabled, )?unavailable")

MLP = str(REPO / "configs" / "mlp.yaml")
FAST = ["strategy.name=single", "metrics.progress=none", "train.eval_every=0", "train.log_every=5",
        "train.optimizer=adamw", "train.lr=0.003", "data.eval_fraction=0.2"]


def train(run_dir: Path, steps: int, *extra: str) -> Trainer:
    """Train mlp on digits in this process; returns the (closed) trainer."""
    overrides = [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", f"train.steps={steps}", *FAST, *extra]
    with Trainer(MLP, overrides=overrides) as trainer:
        trainer.fit()
    return trainer


def log_lines(run_dir: Path, needle: str) -> List[str]:
    return [line for line in (run_dir / "logs" / "rank0.log").read_text().splitlines() if needle in line]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run with committed checkpoints at steps 5 and 10."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "base"
    train(run_dir, 10, "checkpoint.every=5")
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_committed_layout_manifest_and_latest(two_checkpoints):
    root = two_checkpoints / "checkpoints"
    assert [s for s, _ in committed(root)] == [5, 10]
    assert read_latest(root) == step_name(10)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    ckpt = root / step_name(10)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"dcp/.metadata", "trainer_state.json", "rng/rank0.json"} <= on_disk
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["world_size"] == 1 and state["config"]["train"]["steps"] == 10
    assert (state["data_epoch"], state["data_offset"]) == divmod(10 * 64, 1438)
    assert set(state["versions"]) == {"distrain", "torch"} and len(state["config_hash"]) == 16
    assert problem(ckpt) is None


def _truncate(ckpt: Path) -> None:
    shard = ckpt / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _flip_byte(ckpt: Path) -> None:
    shard = ckpt / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _drop_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


@pytest.mark.parametrize("damage, expected", [
    (_truncate, "truncated"), (_flip_byte, "sha256"), (_drop_manifest, "manifest.json is missing"),
])
def test_damaged_checkpoint_is_detected_and_resume_falls_back(two_checkpoints, tmp_path, damage, expected):
    run_dir = copy_run(two_checkpoints, tmp_path / "base")
    damage(run_dir / "checkpoints" / step_name(10))
    assert expected in problem(run_dir / "checkpoints" / step_name(10))
    overrides = [f"run.dir={tmp_path}", "run.name=base", "train.steps=10", *FAST]
    with Trainer(MLP, overrides=overrides) as trainer:
        assert trainer.step == 5
        trainer.fit()
    skipped = log_lines(run_dir, "skipped invalid checkpoint")
    assert len(skipped) == 1 and "step_00000010" in skipped[0] and expected in skipped[0]
    assert "falling back to step_00000005" in skipped[0]
    assert read_latest(run_dir / "checkpoints") == step_name(10)  # the re-save at step 10 replaced the bad one
    assert problem(run_dir / "checkpoints" / step_name(10)) is None


def test_explicit_path_to_a_damaged_checkpoint_is_an_error(two_checkpoints, tmp_path):
    run_dir = copy_run(two_checkpoints, tmp_path / "base")
    bad = run_dir / "checkpoints" / step_name(10)
    _flip_byte(bad)
    with pytest.raises(CheckpointError, match="sha256"):
        Trainer(MLP, overrides=[f"run.dir={tmp_path}", "run.name=other", f"train.resume={bad}", *FAST])


def test_resume_continues_the_uninterrupted_trajectory_in_process(two_checkpoints, tmp_path):
    straight = train(tmp_path / "straight", 10)
    resumed = train(tmp_path / "resumed", 10, f"train.resume={two_checkpoints / 'checkpoints' / step_name(5)}")
    a, b = straight.full_state_dict(), resumed.full_state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_resume_into_a_changed_config(two_checkpoints, tmp_path):
    src = two_checkpoints / "checkpoints" / step_name(10)
    common = [f"run.dir={tmp_path}", f"train.resume={src}", *FAST]
    with pytest.raises(CheckpointError) as err:
        Trainer(MLP, overrides=[*common, "run.name=a", "train.lr=0.01", "model.kwargs.hidden=64"])
    assert "model.kwargs.hidden" in str(err.value) and "train.lr" in str(err.value)
    # What may change: length, cadences, micro-batch, location.
    with Trainer(MLP, overrides=[*common, "run.name=b", "train.steps=12", "train.micro_batch=16",
                                 "train.log_every=3", "checkpoint.every=7"]) as trainer:
        assert trainer.step == 10 and trainer.plan.grad_accum == 4
        trainer.fit()
    assert trainer.step == 12


def test_retention_keeps_exactly_the_last_k_and_every_mth(tmp_path):
    assert steps_to_keep([5, 10, 15, 20, 25, 30, 35, 40], keep_last=2, keep_every=20) == {20, 35, 40}
    assert steps_to_keep([3, 6, 9], keep_last=5, keep_every=0) == {3, 6, 9}
    run_dir = tmp_path / "ret"
    train(run_dir, 40, "checkpoint.every=5", "checkpoint.keep_last=2", "checkpoint.keep_every=20")
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000020", "step_00000035", "step_00000040"]
    assert read_latest(root) == "step_00000040"


def test_save_is_idempotent_and_at_end_does_not_duplicate(tmp_path):
    run_dir = tmp_path / "idem"
    overrides = [f"run.dir={tmp_path}", "run.name=idem", "train.steps=6", "checkpoint.every=3", *FAST]
    with Trainer(MLP, overrides=overrides) as trainer:
        trainer.fit()  # saves at 3 and 6 (every); at_end finds step 6 saved already
        again = trainer.save_checkpoint("manual")
    assert again == run_dir / "checkpoints" / step_name(6)
    assert len(log_lines(run_dir, "checkpoint: saved step 6")) == 1
    assert [s for s, _ in committed(run_dir / "checkpoints")] == [3, 6]


def test_resume_never_and_missing_path(two_checkpoints, tmp_path):
    run_dir = copy_run(two_checkpoints, tmp_path / "base")
    with Trainer(MLP, overrides=[f"run.dir={tmp_path}", "run.name=fresh", "train.resume=never", *FAST]) as trainer:
        assert trainer.step == 0
        trainer.load_checkpoint(run_dir)  # a run directory: its newest valid checkpoint
        assert trainer.step == 10
        trainer.load_checkpoint(run_dir / "checkpoints" / step_name(5))
        assert trainer.step == 5
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(MLP, overrides=[f"run.dir={tmp_path}", "run.name=x", f"train.resume={run_dir}/nope", *FAST])


def test_ckpt_ls_and_inspect_cli(two_checkpoints, tmp_path, capsys):
    run_dir = copy_run(two_checkpoints, tmp_path / "base")
    _truncate(run_dir / "checkpoints" / step_name(5))
    (run_dir / "checkpoints" / "step_00000015.tmp-deadbeef").mkdir()
    code, stdout, err = run_cli_here(["ckpt", "ls", run_dir], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    row5 = next(line for line in lines if line.startswith("step_00000005"))
    row10 = next(line for line in lines if line.startswith("step_00000010"))
    assert "NO:" in row5 and "truncated" in row5
    assert row10.split()[1] == "10" and "yes (latest)" in row10 and " 1 " in row10 and "KiB" in row10
    assert "uncommitted" in next(line for line in lines if "tmp-deadbeef" in line)

    code, stdout, err = run_cli_here(["ckpt", "inspect", run_dir / "checkpoints" / step_name(10), "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["model.1.weight"]["shape"] == [128, 64] and tensors["model.1.weight"]["dtype"] == "float32"
    assert "optim.state.1.weight.exp_avg" in tensors
    assert info["trainer_state"]["step"] == 10 and info["summary"]["world size"] == 1

    code, _, err = run_cli_here(["ckpt", "export", tmp_path / "nowhere", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_async_save_in_one_process_commits_and_resumes_exactly(tmp_path):
    straight = train(tmp_path / "straight", 8)
    run_dir = tmp_path / "async"
    train(run_dir, 8, "checkpoint.every=4", "checkpoint.async_save=true")
    root = run_dir / "checkpoints"
    assert [s for s, _ in committed(root)] == [4, 8] and read_latest(root) == step_name(8)
    assert len(log_lines(run_dir, "async: training blocked")) == 2
    resumed = train(tmp_path / "resumed", 8, f"train.resume={root / step_name(4)}")
    a, b = straight.full_state_dict(), resumed.full_state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


class _FakeClock:
    """The checkpointer's clock, advanced by the test: a time-based cadence that cannot depend on machine load."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize("async_save", [False, True])
def test_every_minutes_saves_once_per_interval_sync_and_async(tmp_path, monkeypatch, async_save):
    """Every step takes 10 (fake) seconds and checkpoint.every_minutes is 0.5: a save every third step. An async
    save used to leave the time of the last save as it was, so the next step saved again (3, 4, 7, 10)."""
    import distrain.checkpoint.checkpointer as checkpointer_module

    clock = _FakeClock()
    monkeypatch.setattr(checkpointer_module, "time",
                        SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter, time=time.time,
                                        sleep=time.sleep))
    run_dir = tmp_path / "timed"
    overrides = [f"run.dir={tmp_path}", "run.name=timed", "train.steps=12", *FAST, "checkpoint.every_minutes=0.5",
                 "checkpoint.keep_last=10", "checkpoint.at_end=false", f"checkpoint.async_save={async_save}"]
    with Trainer(MLP, overrides=overrides) as trainer:
        step = trainer.train_step

        def ten_seconds_each(index: int):
            clock.now += 10.0
            return step(index)
        trainer.train_step = ten_seconds_each
        trainer.fit()
    root = run_dir / "checkpoints"
    assert [s for s, _ in committed(root)] == [3, 6, 9, 12]
    assert {json.loads((p / "manifest.json").read_text())["reason"] for _, p in committed(root)} == {"every_minutes"}


def test_the_time_the_loop_waits_for_the_previous_async_save_is_reported(tmp_path, monkeypatch):
    import distrain.checkpoint.checkpointer as checkpointer_module

    real = checkpointer_module.write_manifest

    def slow_manifest(*args, **kwargs):  # a commit that takes a while (a big checkpoint, a slow disk)
        time.sleep(2.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpointer_module, "write_manifest", slow_manifest)
    run_dir = tmp_path / "busy"
    train(run_dir, 4, "checkpoint.every=2", "checkpoint.async_save=true", "checkpoint.at_end=false")
    waited = log_lines(run_dir, "the training loop waited")
    assert len(waited) == 1 and "for the async save of step 2 to finish before saving step 4" in waited[0]
    seconds = float(waited[0].split("waited ")[1].split(" s")[0])  # 2 s of commit, less two quick steps
    assert 0.01 <= seconds <= 10
    blocked = log_lines(run_dir, "saved step 4")
    assert f"({seconds:.2f} s of it waiting for the previous save)" in blocked[0]
    assert [s for s, _ in committed(run_dir / "checkpoints")] == [2, 4]


def test_export_eval_and_inspect_say_which_checkpoint_was_skipped_and_which_is_used(two_checkpoints, tmp_path,
                                                                                    capsys):
    run_dir = copy_run(two_checkpoints, tmp_path / "base")
    _truncate(run_dir / "checkpoints" / step_name(10))
    note = f"distrain: warning: {run_dir}: skipped invalid checkpoint(s) step_00000010 (dcp/__0_0.distcp is "
    used = "(truncated or overwritten)); falling back to step_00000005"

    code, out, err = run_cli_here(["ckpt", "export", run_dir, "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    assert note in err and used in err and err.count("skipped invalid") == 1
    assert f"from {run_dir / 'checkpoints' / step_name(5)}" in out

    code, out, err = run_cli_here(["eval", run_dir, "--json"], capsys)
    assert code == 0, err
    assert note in err and used in err and err.count("skipped invalid") == 1
    assert json.loads(out)["step"] == 5

    code, out, err = run_cli_here(["ckpt", "inspect", run_dir], capsys)
    assert code == 0 and note in err and f"checkpoint: {run_dir / 'checkpoints' / step_name(5)}" in out


# --- checkpoint compat as a pure function ----------------------------------------------------------------------
def test_compat_accepts_what_may_change_and_names_every_key_that_may_not():
    from distrain.checkpoint.compat import check_resume_config, differing_keys
    from distrain.config import to_container

    saved = to_container(load_config(None))
    allowed = to_container(load_config(None, ["train.steps=500", "train.micro_batch=8", "run.name=other",
                                              "dist.timeout_s=60", "checkpoint.every=5", "metrics.progress=none"]))
    assert differing_keys(saved, allowed) == [] and check_resume_config(saved, allowed, "step_10") == []
    changed = to_container(load_config(None, ["train.lr=0.5", "model.kwargs.hidden=3", "train.steps=500"]))
    assert differing_keys(saved, changed) == ["model.kwargs", "model.kwargs.hidden", "train.lr"]
    with pytest.raises(CheckpointError) as err:
        check_resume_config(saved, changed, "step_10")
    assert err.value.key == "model.kwargs"
    assert "train.lr: 0.001 in the checkpoint, 0.5 now" in str(err.value) and "Cannot resume from step_10" in str(err.value)


def test_compat_lets_the_data_move_and_leaves_what_they_are_to_the_fingerprint():
    """A corpus moved to another directory is the same data: a resume with a new data.kwargs.path is not refused by
    the config check (train.resume_data's fingerprint comparison decides; test_data_fingerprint), whatever
    train.resume_data says; another data set (data.name) still is."""
    from distrain.checkpoint.compat import differing_keys
    from distrain.config import to_container

    saved = to_container(load_config(None, ["data.name=tokens", "data.kwargs.path=/old/shards"]))
    for policy in ("check", "accept"):
        moved = to_container(load_config(None, ["data.name=tokens", "data.kwargs.path=/new/shards",
                                                f"train.resume_data={policy}"]))
        assert differing_keys(saved, moved) == []
    other = to_container(load_config(None, ["data.name=images", "data.kwargs.path=/new/shards"]))
    assert differing_keys(saved, other) == ["data.name"]


def test_compat_reads_a_key_an_older_checkpoint_lacks_as_its_default():
    """A checkpoint written before data.collate_fn (or any later key) existed resumes while the key is at its
    default, and is refused when it is not."""
    from distrain.checkpoint.compat import differing_keys
    from distrain.config import to_container

    saved = to_container(load_config(None))
    del saved["data"]["collate_fn"], saved["train"]["on_nonfinite"]
    assert differing_keys(saved, to_container(load_config(None))) == []
    changed = to_container(load_config(None, ["train.on_nonfinite=skip_step"]))
    assert differing_keys(saved, changed) == ["train.on_nonfinite"]


def test_compat_notes_a_cosine_schedule_that_now_decays_over_another_length():
    from distrain.checkpoint.compat import check_resume_config
    from distrain.config import to_container

    saved = to_container(load_config(None, ["train.lr_schedule=cosine"]))
    longer = to_container(load_config(None, ["train.lr_schedule=cosine", "train.steps=300"]))
    assert check_resume_config(saved, longer, "x") == ["train.steps changed from 100 to 300: the cosine schedule now "
                                                       "decays over the new length"]
