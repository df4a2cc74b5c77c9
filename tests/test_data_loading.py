"""The step loader in one process: DataLoader workers, restarts at any step, per-sample seeding, Mapping samples,
collate_fn, worker failures. (Across world sizes and resumes: tests/test_data_exactness.py.)"""

from __future__ import annotations

import random
from collections import UserDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from distrain.config import load_config
from distrain.data import (GlobalStepSampler, LoaderOptions, StepLoader, auto_num_workers, build_datasets,
                           move_to, resolve_collate_fn, sample_rng, sample_seed, split_input_target)
from distrain.data.collate import collate_samples
from distrain.data.fetching import BatchKey
from distrain.data.loader import EvalLoader
from distrain.errors import ConfigError, DataError, DataLoadingError

CPU = torch.device("cpu")


class Noisy(Dataset):
    """Per-sample randomness three ways: sample_rng(), the global torch RNG and numpy's global RNG."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        own = torch.rand(2, generator=sample_rng())
        return torch.cat([own, torch.rand(1), torch.tensor([float(np.random.rand()), float(i)])]), i % 3


def _loader(dataset, workers, end=100, micro=4, world=1, rank=0, global_batch=8, collate_fn=None, persistent=True):
    options = LoaderOptions(num_workers=workers, pin_memory=False, prefetch_factor=2 if workers else None,
                            persistent_workers=persistent and workers > 0, collate_fn=collate_fn)
    sampler = GlobalStepSampler(len(dataset), global_batch, seed=5)
    return StepLoader(dataset, sampler, rank, world, micro, end, options, CPU, seed=5)


def _steps(loader, steps):
    return [[b[0].clone() for b in loader.micro_batches(s)] for s in steps]


def test_per_sample_randomness_is_the_same_with_any_worker_count_and_world_size():
    reference = _loader(Noisy(), 0)
    expected = _steps(reference, range(6))
    reference.close()
    for workers in (1, 2):
        loader = _loader(Noisy(), workers)
        got = _steps(loader, range(6))
        loader.close()
        assert all(torch.equal(a, b) for x, y in zip(expected, got) for a, b in zip(x, y)), f"workers={workers}"
    # two ranks of W=2 together fetch exactly W=1's samples of a step, with the same random draws
    halves = [_loader(Noisy(), 2, rank=r, world=2) for r in (0, 1)]
    for step in range(6):
        both = torch.cat([b[0] for loader in halves for b in loader.micro_batches(step)])
        assert torch.equal(both, torch.cat(expected[step]))
    for loader in halves:
        loader.close()
    # the draws depend on the step: sample i is augmented differently when it comes back in a later epoch
    rows = {int(r[-1]): r[:-1] for step in expected for b in step for r in b}
    assert len(rows) > 1 and not torch.equal(expected[0][0], expected[5][0])


def test_fetching_in_the_training_process_leaves_its_rng_alone():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    untouched = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    loader = _loader(Noisy(), 0)
    loader.micro_batches(0)
    assert (torch.equal(torch.rand(3), untouched[0]), random.random(), np.random.rand()) == (True, *untouched[1:])


def test_a_restart_starts_at_the_asked_step_without_replay_or_skip():
    train, _ = build_datasets("regression", {"num_samples": 64, "dim": 3}, 0.2)
    sampler = GlobalStepSampler(len(train), 8, seed=5)
    for workers, persistent in ((0, False), (2, True), (2, False)):
        loader = _loader(train, workers, end=10, persistent=persistent)
        for step in (0, 1, 7, 3, 4, 12, 13):  # jumps back and forth, and past the configured end
            got = loader.micro_batches(step)
            expected = [train.inputs[idx] for idx in sampler.micro_batches(step, 0, 1, 4)]
            assert all(torch.equal(a[0], b) for a, b in zip(got, expected)), (workers, step)
        loader.close()


def test_auto_workers_come_from_cpus_per_rank_and_skip_in_memory_tensors():
    train, _ = build_datasets("digits", {}, 0.2)
    assert auto_num_workers(train, 1, cpus=16) == 0  # a gather of in-memory tensors gains nothing from a worker
    assert [auto_num_workers(Noisy(), w, cpus=16) for w in (1, 2, 4, 8, 16)] == [8, 7, 3, 1, 0]
    assert auto_num_workers(Noisy(), 1, cpus=2) == 1 and auto_num_workers(Noisy(), 2, cpus=2) == 0
    cfg = load_config(None, ["data.num_workers=3"])
    opts = LoaderOptions.resolve(cfg.data, Noisy(), CPU, 1, grad_accum=8)
    assert (opts.num_workers, opts.prefetch_factor, opts.pin_memory, opts.persistent_workers) == (3, 3, False, True)
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, ["data.num_workers=-1"])


class Records(Dataset):
    """Dict samples, as tokenizers and HF datasets give them; ``kind`` picks the Mapping type."""

    def __init__(self, kind=dict, broken_at=None, raise_at=None):
        self.kind, self.broken_at, self.raise_at = kind, broken_at, raise_at

    def __len__(self):
        return 32

    def __getitem__(self, i):
        if i == self.raise_at:
            raise ValueError(f"cannot decode record {i}")
        sample = self.kind(input=[float(i), 1.0, 2.0], target=torch.tensor([float(i % 2)]))
        if i == self.broken_at:
            sample["extra"] = torch.zeros(1)
        return sample


def test_mapping_samples_collate_per_key_keep_their_type_and_move():
    batch = collate_samples([Records(UserDict)[i] for i in range(4)])
    assert isinstance(batch, UserDict) and batch["input"].shape == (4, 3) and batch["target"].shape == (4, 1)
    assert batch["input"].dtype == torch.float32  # lists of numbers became tensors
    moved = move_to(batch, CPU)
    assert isinstance(moved, UserDict) and torch.equal(moved["input"], batch["input"])
    x, y = split_input_target(moved)
    assert x is moved["input"] and y is moved["target"]
    with pytest.raises(TypeError, match="must be an \\(input, target\\) pair or a Mapping.*got a Mapping with keys \\[.input_ids.\\]"):
        split_input_target({"input_ids": torch.zeros(1)})


def test_transformers_batch_encoding_is_a_mapping_batch():
    transformers = pytest.importorskip("transformers")
    samples = [transformers.BatchEncoding({"x": [i, i + 1], "y": torch.tensor(i)}) for i in range(3)]
    batch = collate_samples(samples)
    assert isinstance(batch, transformers.BatchEncoding) and batch["x"].tolist() == [[0, 1], [1, 2], [2, 3]]
    assert isinstance(move_to(batch, CPU), transformers.BatchEncoding)


@pytest.mark.parametrize("workers", [0, 2])
def test_inconsistent_keys_and_a_raising_dataset_name_the_sample_and_step(workers):
    loader = _loader(Records(broken_at=None), workers)
    sampler = GlobalStepSampler(32, 8, seed=5)
    broken = sampler.micro_batches(1, 0, 1, 4)[1][2]  # a sample of step 1's second micro-batch
    loader.close()
    loader = _loader(Records(broken_at=broken), workers)
    loader.micro_batches(0)
    with pytest.raises(DataError, match=f"inconsistent keys.*sample {broken} has keys \\['extra', 'input', 'target'\\]"
                                        f".*step 1"):
        loader.micro_batches(1)
    loader.close()
    loader = _loader(Records(raise_at=broken), workers)
    with pytest.raises(DataLoadingError, match=f"Loading sample {broken} of the training data \\(Records\\) for step 1 "
                                               f"failed on rank 0 in {'DataLoader worker' if workers else 'the training'}"
                                               f".*ValueError: cannot decode record {broken}"):
        loader.micro_batches(1)
    loader.close()


def test_a_killed_worker_is_an_error_not_a_hang():
    class Dies(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    loader = _loader(Dies(), 1)
    with pytest.raises(DataLoadingError, match=r"DataLoader worker 0 \(pid \d+\) loading the training data \(Dies\) "
                                               r"on rank 0 was killed by signal SIGKILL \(Killed\) in training step 1 "):
        loader.micro_batches(0)
    loader.close()


def pad_collate(samples):
    """A collate_fn for the tests: pads 'input' to the longest sample."""
    longest = max(len(s["input"]) for s in samples)
    return {"input": torch.tensor([s["input"] + [0.0] * (longest - len(s["input"])) for s in samples]),
            "target": torch.stack([s["target"] for s in samples])}


class Ragged(Records):
    def __getitem__(self, i):
        return {"input": [1.0] * (1 + i % 3), "target": torch.tensor([1.0])}


def test_collate_fn_by_dotted_path_or_callable_and_bad_paths():
    assert resolve_collate_fn("test_data_loading:pad_collate") is pad_collate
    assert resolve_collate_fn("test_data_loading.pad_collate") is pad_collate and resolve_collate_fn(None) is None
    for path, message in (("no_such_module_x:f", "does not import: ModuleNotFoundError"),
                          ("test_data_loading:missing", "has no function 'missing'"), ("nodots", "not a dotted path")):
        with pytest.raises(ConfigError, match=message):
            resolve_collate_fn(path)
    with pytest.raises(DataError, match="'input' values cannot be stacked.*collate_fn"):
        _loader(Ragged(), 0).micro_batches(0)
    loader = _loader(Ragged(), 2, collate_fn=pad_collate)
    batch = loader.micro_batches(0)[0]
    assert batch["input"].shape[0] == 4 and batch["input"].shape[1] == 3
    loader.close()


def test_subset_of_a_per_sample_dataset_is_fetched_per_sample():
    subset = Subset(Noisy(), list(range(0, 40, 2)))
    loader = _loader(subset, 0)
    assert loader.micro_batches(0)[0][0].shape == (4, 5)  # sample_rng() worked: each sample had its own context


def test_eval_loader_pads_and_seeds_the_same_on_every_pass():
    keys = [BatchKey(-1, 0, (0, 1, 2)), BatchKey(-1, 1, (0,), padding=True)]
    options = LoaderOptions(num_workers=2, pin_memory=False, prefetch_factor=2, persistent_workers=True)
    loader = EvalLoader(Noisy(), keys, options, CPU, seed=5, rank=0)
    first = [(k, b[0].clone()) for k, b in loader]
    second = [(k, b[0].clone()) for k, b in loader]
    loader.close()
    assert [k for k, _ in first] == keys and all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))


def test_sample_seed_outside_the_loader_explains_itself():
    with pytest.raises(RuntimeError, match="no sample being fetched"):
        sample_seed()


def test_trainer_trains_on_dict_samples_with_workers(tmp_path):
    import distrain

    config = {"run": {"name": "dicts", "dir": str(tmp_path)}, "train": {"global_batch": 8, "micro_batch": 4,
              "steps": 4, "eval_every": 0}, "metrics": {"progress": "none"}, "checkpoint": {"at_end": False},
              "data": {"num_workers": 2, "collate_fn": "test_data_loading:pad_collate"}}
    with distrain.Trainer(config, model=nn.Linear(3, 1), train_data=Records(), eval_data=Records(),
                          loss_fn=nn.functional.mse_loss) as trainer:
        final = trainer.fit()
    assert final["step"] == 4 and "eval_loss" in final


def test_workers_ignore_the_stop_signals_the_training_process_handles():
    """torchrun and SLURM signal the whole process group: a worker must not die (or run the trainer's handler)."""
    import os
    import signal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("trainer"))
    try:
        loader = _loader(Noisy(), 2)
        loader.micro_batches(0)
        workers = [w.pid for w in loader.keyed.loader._iterator._workers]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        for step in range(1, 6):
            loader.micro_batches(step)  # still served by the same, living workers
        assert [w.pid for w in loader.keyed.loader._iterator._workers] == workers
        assert all(w.is_alive() for w in loader.keyed.loader._iterator._workers) and not seen
        loader.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_hugging_face_dataset_object_trains_through_the_api(tmp_path):
    datasets = pytest.importorskip("datasets")
    import distrain

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, generator=g)
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "y": (x.sum(1, keepdim=True)).tolist()})  # rows of lists
    config = {"run": {"name": "hf-object", "dir": str(tmp_path)}, "train": {"global_batch": 16, "steps": 3,
              "eval_every": 0}, "metrics": {"progress": "none"}, "checkpoint": {"at_end": False},
              "data": {"num_workers": 1}}
    with distrain.Trainer(config, model=nn.Linear(3, 1), train_data=ds, eval_data=ds.select(range(8)),
                          loss_fn=nn.functional.mse_loss) as trainer:
        final = trainer.fit()
    assert final["step"] == 3 and final["eval_loss"] > 0
