"""A checkpoint records a fingerprint of its data, and a resume on other data is refused in one paragraph naming what
differs, unless train.resume_data=accept: end to end through the CLI on token shards prepared again, through the
Python API on a user's TensorDataset; and the fingerprint itself on the kinds of items datasets return."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import run_cli
from data_fixtures import token_shards
from distrain.checkpoint.paths import read_latest
from distrain.checkpoint.manifest import read_manifest, write_manifest
from distrain.data.fingerprint import fingerprint, fingerprint_data, sample_indices
from distrain.errors import ConfigError


def _paragraph(text: str) -> str:
    return " ".join(text.split())


def _config(tmp_path: Path, shards: Path) -> Path:
    path = tmp_path / "gpt.yaml"
    path.write_text(f"run: {{name: fp, dir: {tmp_path / 'runs'}}}\n"
                    f"model: {{name: gpt, kwargs: {{embed: 16, heads: 2, layers: 1}}}}\n"
                    f"data: {{name: tokens, kwargs: {{path: {shards}, block_size: 16, eval_windows: 8}}}}\n"
                    f"train: {{global_batch: 8, steps: 6}}\nmetrics: {{progress: none}}\n")
    return path


def _latest(run: Path) -> Path:
    root = run / "checkpoints"
    return root / read_latest(root)


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_a_resume_on_token_shards_prepared_again_is_refused_unless_accepted(tmp_path):
    shards = token_shards(tmp_path / "shards", max_bytes=40_000, shard_tokens=20_000)
    config = _config(tmp_path, shards)
    first = run_cli(["train", str(config)])
    assert first.returncode == 0, first.stderr
    state = json.loads((_latest(tmp_path / "runs" / "fp") / "trainer_state.json").read_text())
    recorded = state["data_fingerprint"]["train"]
    assert recorded["kind"] == "tokens" and recorded["length"] > 0 and all(s["sha256"] for s in recorded["shards"])

    shutil.rmtree(shards)  # the same path, a larger corpus
    token_shards(shards, max_bytes=60_000, shard_tokens=20_000)
    refused = run_cli(["train", str(config), "train.steps=8"])
    message = _paragraph(refused.stderr)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and message.count("distrain: error:") == 1
    assert "Cannot resume from" in message and "the data differ from those it was trained on" in message
    assert f"train data: {recorded['length']:,} windows in the checkpoint" in message
    assert "shard train-000002.bin added" in message and "eval data: shard eval-000000.bin has" in message
    assert "train.resume_data=accept" in message, message
    assert not (tmp_path / "runs" / "fp" / "checkpoints" / "step_00000008").exists()

    accepted = run_cli(["train", str(config), "train.steps=8", "train.resume_data=accept"])
    assert accepted.returncode == 0, accepted.stderr
    warning = _paragraph(accepted.stderr)
    assert "warning: resume: the data differ from those checkpoint" in warning and "train.resume_data=accept" in warning
    log = (tmp_path / "runs" / "fp" / "logs" / "rank0.log").read_text()
    assert "at step 6" in log and _latest(tmp_path / "runs" / "fp").name == "step_00000008"

    # A checkpoint written before fingerprints (none in its trainer state) resumes with a note.
    checkpoint = _latest(tmp_path / "runs" / "fp")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["data_fingerprint"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    manifest = read_manifest(checkpoint)
    write_manifest(checkpoint, None, **{k: v for k, v in manifest.items()
                                        if k not in ("format", "created", "total_bytes", "files")})
    shutil.rmtree(shards)
    token_shards(shards, max_bytes=50_000, shard_tokens=20_000)
    resumed = run_cli(["train", str(config), "train.steps=9"])
    assert resumed.returncode == 0, resumed.stderr
    log = _paragraph((tmp_path / "runs" / "fp" / "logs" / "rank0.log").read_text())
    assert "at step 8" in log and "the checkpoint records no fingerprint of its data" in log


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x)


def _fit(tmp_path: Path, data: TensorDataset, *overrides: str) -> None:
    from distrain import Trainer

    cfg = {"run": {"name": "api", "dir": str(tmp_path / "runs")}, "train": {"global_batch": 8, "steps": 6},
           "data": {"num_workers": 0}, "metrics": {"progress": "none"}}
    with Trainer(cfg, overrides=list(overrides), model=_Linear(), train_data=data,
                 loss_fn=nn.functional.mse_loss) as trainer:
        trainer.fit()


def test_a_users_tensor_dataset_changed_between_runs_is_refused(tmp_path):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    _fit(tmp_path, TensorDataset(x, x.sum(1, keepdim=True)))
    changed = x.clone()
    changed[sample_indices(64)[3]] += 1.0  # one sampled item, the same length
    with pytest.raises(ConfigError) as err:
        _fit(tmp_path, TensorDataset(changed, changed.sum(1, keepdim=True)), "train.steps=8")
    assert err.value.key == "train.resume_data" and "\n" not in str(err.value)
    assert f"train data: the same length, but the items at {sample_indices(64)[3]} (of 8 sampled) differ" in str(
        err.value)
    with pytest.raises(ConfigError, match="train data: 64 items in the checkpoint, 48 now"):
        _fit(tmp_path, TensorDataset(x[:48], x[:48].sum(1, keepdim=True)), "train.steps=8")
    _fit(tmp_path, TensorDataset(x, x.sum(1, keepdim=True)), "train.steps=8")  # the same data: resumes


class _Items(Dataset):
    def __init__(self, make, length: int = 5):
        self.make, self.length = make, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.make(i)


def test_items_of_every_kind_hash_stably_and_what_cannot_falls_back_to_the_length(tmp_path):
    from PIL import Image

    def item(i: int):
        return {"pixels": torch.full((2, 3), float(i), dtype=torch.bfloat16), "label": np.int64(i),
                "image": Image.new("L", (4, 4), color=i), "ids": np.arange(i + 1, dtype=np.uint16),
                "meta": ("name", i, 0.5, None, b"raw", [True])}

    notes: list = []
    a, b = fingerprint(_Items(item), "train", notes), fingerprint(_Items(item), "train", notes)
    assert a == b and a["samples"] is not None and not notes
    assert fingerprint(_Items(lambda i: item(i + (i == 4))), "train", notes)["samples"] != a["samples"]

    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    noisy = fingerprint(_Items(lambda i: torch.rand(3)), "train", notes)  # seeded per item: stable
    assert noisy["samples"] is not None and torch.equal(torch.get_rng_state(), state[0])
    assert (np.random.get_state()[1] == state[1]).all() and random.getstate() == state[2]

    unseeded = np.random.default_rng()
    odd = fingerprint(_Items(lambda i: unseeded.random(2)), "eval", notes)
    assert odd == {"kind": "items", "length": 5, "samples": None} and "differs between two reads" in notes[-1]
    fingerprint(_Items(lambda i: object()), "train", notes)
    assert "could not be fingerprinted (Unhashable: an item holds a builtins.object)" in notes[-1]
    assert fingerprint_data(_Items(item), None)["eval"] is None
