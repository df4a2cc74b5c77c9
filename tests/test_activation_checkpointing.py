"""``train.activation_checkpointing``: the same parameters as without it, and less activation memory.

Memory is measured with torch's own MemTracker (torch.distributed._tools.mem_tracker), which attributes every
live tensor of one forward + backward to parameters, gradients, activations or temporaries and keeps the peak.
"""

from __future__ import annotations

import pytest
import torch

from distrain.data import build_datasets, fetch_batch
from distrain.errors import ConfigError
from distrain.models import build_model
from distrain.config import load_config
from distrain.config.validation import checkpoint_every
from distrain.models import activation_checkpointing
from distrain.models.activation_checkpointing import apply_activation_checkpointing

MODES = ("none", "every:2", "full")
pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, mode: str) -> dict:
    from distrain.training.trainer import Trainer

    overrides = ["train.global_batch=8", "train.micro_batch=4", "train.steps=4", "train.eval_every=0",
                 "data.kwargs.max_chars=20000", "data.kwargs.block_size=32", "data.eval_fraction=0.01",
                 "metrics.progress=none", f"run.dir={tmp_path}", f"run.name={mode}",
                 "checkpoint.at_end=false", "strategy.name=single", "model.kwargs={embed: 32, heads: 4, layers: 4}",
                 f"train.activation_checkpointing={mode}"]
    with Trainer("configs/gpt.yaml", overrides=overrides) as trainer:
        trainer.fit()
        return trainer.full_state_dict()


def test_checkpointing_trains_to_the_same_parameters(tmp_path):
    reference, weights = _train(tmp_path, "none"), _train(tmp_path, "full")
    worst = max(float((weights[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in reference.items())
    assert worst <= 1e-6, f"max relative difference {worst:.3e}"


def _peak_activation_bytes(mode: str) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    train, _ = build_datasets("text", {"max_chars": 20000, "block_size": 128}, 0.1)
    x, y = fetch_batch(train, list(range(16)))
    torch.manual_seed(0)
    model = build_model("gpt", {"embed": 128, "heads": 4, "layers": 4}, train.spec)
    apply_activation_checkpointing(model, mode, None)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"activations": peak[next(k for k in peak if str(k).endswith("ACT"))], "total": peak["Total"]}


def test_checkpointing_lowers_peak_activation_memory():
    peaks = {mode: _peak_activation_bytes(mode) for mode in MODES}
    print("peak memory of one forward+backward (gpt 4 x 128, batch 16 x 128 tokens), MiB:",
          {m: {k: round(v / 2**20, 1) for k, v in p.items()} for m, p in peaks.items()})
    assert peaks["full"]["activations"] < peaks["every:2"]["activations"] < peaks["none"]["activations"]
    assert peaks["full"]["total"] < peaks["none"]["total"]


def test_modes_and_models_without_blocks_are_explained():
    assert [checkpoint_every(m) for m in ("none", "full", "every:3")] == [0, 1, 3]
    with pytest.raises(ConfigError, match="every:N"):
        checkpoint_every("every:0")
    train, _ = build_datasets("digits", {}, 0.2)
    with pytest.raises(ConfigError, match="no nn.ModuleList of blocks.*train.blocks") as err:
        apply_activation_checkpointing(build_model("mlp", {}, train.spec), "full", None)
    assert err.value.key == "train.activation_checkpointing"
    cnn = build_model("cnn", {}, train.spec)
    assert apply_activation_checkpointing(cnn, "full", ["Conv2d"]) == 2  # by class name, for any model


def test_a_bad_mode_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*every:N"):
        load_config("configs/gpt.yaml", ["train.activation_checkpointing=half"])


@pytest.mark.parametrize("mode", ["FULL", "Every:2", "every:02", "every:0", "half"])
def test_one_parser_refuses_the_same_modes_when_the_config_loads_and_when_applied(mode):
    """train.activation_checkpointing has one parser: a mode the config refuses is never applied either."""
    assert activation_checkpointing.checkpoint_every is checkpoint_every
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*every:N"):
        load_config("configs/gpt.yaml", [f"train.activation_checkpointing={mode}"])
    train, _ = build_datasets("digits", {}, 0.2)
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*every:N") as err:
        apply_activation_checkpointing(build_model("cnn", {}, train.spec), mode, ["Conv2d"])
    assert err.value.key == "train.activation_checkpointing"
