"""data.collate_fn (distrain/data/collate.py) applies to every dataset, the built-ins' in-memory batches included,
and exactly: a collate_fn gets the samples dataset[i] would give. A function that cannot collate them is refused
in one paragraph naming data.collate_fn (the CLI cases are in tests/test_bad_inputs.py)."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from torch.utils.data import Dataset, default_collate

from conftest import REPO, read_jsonl, run_cli_here
from distrain.data.datasets import build_datasets
from distrain.data.batches import fetch_batch
from distrain.errors import DataError

INDICES = [3, 1, 4, 1, 5]


def test_a_collate_fn_receives_the_samples_of_a_builtin_in_memory_batch():
    train, _ = build_datasets("digits", {}, 0.2)
    seen: List[List[Any]] = []

    def spy(samples: List[Any]) -> Any:
        seen.append(samples)
        return default_collate(samples)

    batch = fetch_batch(train, INDICES, spy)
    assert len(seen) == 1 and len(seen[0]) == len(INDICES)
    for (image, label), index in zip(seen[0], INDICES):
        assert torch.equal(image, train[index][0]) and torch.equal(label, train[index][1])
    plain = fetch_batch(train, INDICES)  # the built-in's own one-gather batch
    assert all(torch.equal(a, b) for a, b in zip(batch, plain))


class _DictBatches(Dataset):
    """A dataset whose __getitems__ collates itself into a dict: there are no samples to hand a collate_fn."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(i)])}

    def __getitems__(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        return {"x": torch.tensor([[float(i)] for i in indices])}


def test_a_collate_fn_on_batches_it_cannot_split_is_refused():
    with pytest.raises(DataError, match=r"data.collate_fn needs the samples.*returned one dict"):
        fetch_batch(_DictBatches(), [0, 1], default_collate)


def test_a_collate_fn_that_raises_names_data_collate_fn():
    train, _ = build_datasets("digits", {}, 0.2)
    with pytest.raises(DataError, match=r"data.collate_fn \(getcwd\) failed on a micro-batch of 5 samples: "
                                        r"TypeError: .*must return one batch"):
        fetch_batch(train, INDICES, __import__("os").getcwd)


def _losses(tmp_path, name: str, *overrides: str, capsys) -> List[float]:
    code, _, err = run_cli_here(["train", REPO / "configs" / "quickstart.yaml", f"run.dir={tmp_path}",
                                 f"run.name={name}", "train.steps=4", "train.log_every=1", "metrics.progress=none",
                                 "dist.device=cpu", *overrides], capsys)
    assert code == 0, err
    return [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]


def test_the_quickstart_trains_the_same_through_a_collate_fn(tmp_path, capsys):
    """Built-in in-memory data with data.collate_fn=torch's default_collate: the same losses, bit for bit."""
    plain = _losses(tmp_path, "plain", capsys=capsys)
    through = _losses(tmp_path, "collated", "data.collate_fn=torch.utils.data:default_collate", capsys=capsys)
    assert len(plain) == 4 and through == plain
