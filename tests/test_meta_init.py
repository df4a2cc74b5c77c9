"""Sharded from birth (distrain.models.meta_init): a model built on the meta device and replayed by its modules'
own initialisers has its eager values bit for bit - for the built-ins, for users' models made of torch layers
(tied weights included), at world size 3 under fsdp, ddp and DeepSpeed's zero.Init - and a model whose
constructors do something the replay cannot reproduce is refused with the reason, then built eagerly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import run_torchrun
from distrain.data import build_datasets
from distrain.models import build_model
from distrain.models.meta_init import MetaBuildRefused, build_on_meta, is_meta, materialise
from distrain.strategies import Strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def _eager_and_meta(factory, seed: int = 7):
    torch.manual_seed(seed)
    eager = factory()
    eager_next = torch.rand(4)  # where the generator stands after the build: dropout draws from there
    torch.manual_seed(seed)
    meta = build_on_meta(factory)
    assert is_meta(meta) and all(p.is_meta for p in meta.parameters())
    materialise(meta, torch.device("cpu"))
    assert not is_meta(meta)
    return eager, meta, eager_next, torch.rand(4)


def _assert_same(eager: nn.Module, meta: nn.Module) -> None:
    a, b = eager.state_dict(), meta.state_dict()
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"meta-built values differ from eager ones in {different}"


@pytest.mark.parametrize("name, data, kwargs", [
    ("gpt", "text", {"layers": 3}), ("lstm", "text", {"layers": 2}), ("mlp", "digits", {}), ("cnn", "digits", {})])
def test_builtin_models_replay_their_eager_values_bit_for_bit(name, data, kwargs):
    spec = build_datasets(data, {"max_chars": 5000} if data == "text" else {}, 0.1)[0].spec
    eager, meta, eager_next, meta_next = _eager_and_meta(lambda: build_model(name, kwargs, spec))
    _assert_same(eager, meta)
    assert torch.equal(eager_next, meta_next)


class TiedHead(nn.Module):
    """GPT-2's tying: the head shares the token embedding (both directions of the assignment are tested)."""

    def __init__(self, head_owns: bool):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 16))
        self.head = nn.Linear(16, 50, bias=False)
        if head_owns:
            self.tok.weight = self.head.weight  # nanoGPT's direction
        else:
            self.head.weight = self.tok.weight


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)),
    lambda: TiedHead(head_owns=False), lambda: TiedHead(head_owns=True),
    lambda: nn.TransformerEncoderLayer(16, 4, 32, batch_first=True),  # MultiheadAttention's _reset_parameters
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),  # buffers come along
], ids=["sequential", "tied-head-to-tok", "tied-tok-to-head", "transformer-layer", "batchnorm"])
def test_user_models_of_torch_layers_replay_their_eager_values(factory):
    eager, meta, eager_next, meta_next = _eager_and_meta(factory)
    _assert_same(eager, meta)
    assert torch.equal(eager_next, meta_next)
    if isinstance(meta, TiedHead):
        assert meta.head.weight is meta.tok.weight  # the tie survives to_empty


class NanoStyle(nn.Module):
    """nanoGPT's pattern: every layer is initialised a second time at the end of the root's constructor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)


class NanoStyleFixed(NanoStyle):
    """The same model, with the second initialisation where the replay finds it: the root's init_weights()."""

    def __init__(self):
        nn.Module.__init__(self)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(self._init)


class RandomParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.randn(8))


class ConstantParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 8))


@pytest.mark.parametrize("factory, reason", [
    (NanoStyle, "the eager build also runs aten.normal_"),
    (RandomParameter, "aten.randn"),
    (ConstantParameter, "'cls_token'"),
    (lambda: nn.LazyLinear(4), "UninitializedParameter"),
])
def test_models_the_replay_cannot_reproduce_are_refused_with_the_reason(factory, reason):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(MetaBuildRefused, match=reason):
        build_on_meta(factory)
    assert torch.equal(torch.get_rng_state(), state)  # the eager build that follows starts from the seed


def test_an_init_weights_at_the_end_of_init_is_replayed():
    eager, meta, _, _ = _eager_and_meta(NanoStyleFixed)
    _assert_same(eager, meta)


def test_the_trainer_builds_a_refused_model_eagerly_and_says_why(tmp_path, caplog):
    from distrain.errors import ConfigError
    from distrain.training.trainer import Trainer

    data = [(torch.randn(8), torch.randn(2)) for _ in range(16)]
    config = {"run": {"dir": str(tmp_path), "name": "r"}, "strategy": {"name": "single"},
              "train": {"global_batch": 8, "steps": 1}, "metrics": {"progress": "none"},
              "checkpoint": {"at_end": False}}
    loss = nn.functional.mse_loss

    def nano():
        return nn.Sequential(NanoStyle())

    with Trainer(config, model=nano, train_data=data, loss_fn=loss) as trainer:
        assert not is_meta(trainer.strategy.module)
    log = (tmp_path / "r" / "logs" / "rank0.log").read_text()
    assert "built whole on every rank" in log and "aten.normal_" in log and "reset_parameters()" in log

    with pytest.raises(ConfigError, match="model.init=meta.*aten.normal_") as err:
        Trainer({**config, "model": {"init": "meta"}}, model=nano, train_data=data, loss_fn=loss)
    assert err.value.key == "model.init"
    own = {**config, "model": {"init": "meta"}, "strategy": {"name": "test_meta_init:OwnStrategy"}}
    with pytest.raises(ConfigError, match="takes a built model"):
        Trainer(own, model=lambda: nn.Sequential(nn.Linear(8, 2)), train_data=data, loss_fn=loss)


class OwnStrategy(Strategy):
    """A user's strategy that has not opted into models on the meta device (meta_init stays False)."""

    name = "own"
    needs_process_group = False

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.ctx.device)
        self.optimizer = self._build_optimizer(self.model)


def test_flops_are_counted_on_the_meta_model_without_running_it():
    from distrain.telemetry.flops import flops_per_sample

    torch.manual_seed(0)
    model = build_on_meta(lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)))
    estimate = flops_per_sample(model, None, sample=torch.randn(1, 64))
    assert estimate.per_sample == 3 * 2 * (64 * 256 + 256 * 10)  # forward multiply-adds x 2 FLOPs x 3
    assert all(p.is_meta for p in model.parameters())
    built = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    assert flops_per_sample(built, None, sample=torch.randn(1, 64)).per_sample == estimate.per_sample


@pytest.mark.slow  # minutes of real multi-rank runs: the default run stays under 15 min; CI runs -m slow
def test_world_size_3_starts_every_strategy_from_the_eager_weights(tmp_path):
    """One launch of 3 ranks: fsdp (uneven shards of a 98-row embedding) and DeepSpeed stage 3
    (zero.Init) build the gpt on the meta device; fsdp also a user's factory. Their first full_state_dict() equals
    ``torch.manual_seed(seed); build()`` in this process, bit for bit."""
    proc = run_torchrun(3, ["tests/workers/meta_init_worker.py", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from safetensors.torch import load_file

    from meta_models import user_model

    spec = build_datasets("text", {"max_chars": 20000, "block_size": 32}, 0.1)[0].spec
    torch.manual_seed(11)
    gpt = build_model("gpt", {"embed": 48, "heads": 4, "layers": 3}, spec).state_dict()
    torch.manual_seed(11)
    user = user_model().state_dict()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"fsdp", "deepspeed-3", "fsdp-user"}
    for name, info in results.items():
        assert info["meta"], f"{name} did not build on the meta device"
        weights = load_file(str(tmp_path / f"{name}.safetensors"))
        reference = user if name.endswith("user") else gpt
        assert set(weights) == set(reference), name  # (safetensors stores its keys sorted)
        different = [k for k in reference if not torch.equal(weights[k], reference[k])]
        assert not different, f"{name}: {different}"
        assert math.isfinite(info["flops_per_sample"])
