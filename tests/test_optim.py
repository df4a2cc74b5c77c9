"""Optimizers: weight-decay groups (biases, norms and embeddings excluded by default), the implementation switch
(fused on CUDA), the same groups under every strategy and in checkpoints, and no DDP wrapper at world size 1.

That the groups are the same under every strategy is also what tests/test_strategies.py proves numerically: the
gpt config decays weights (0.1), and every exact strategy lands on DDP's parameters at W=2.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distrain.config import load_config
from distrain.data import build_datasets
from distrain.models import build_model
from distrain.optim import build_optimizer, implementation_kwargs, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(**overrides):
    cfg = load_config("configs/gpt.yaml", [f"train.{k}={v}" for k, v in overrides.items()])
    return cfg.train


def _gpt() -> nn.Module:
    spec = build_datasets("text", {"max_chars": 5000}, 0.1)[0].spec
    return build_model("gpt", {"layers": 2}, spec)


def _names(model: nn.Module, group: dict) -> set:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def test_biases_norms_and_embeddings_get_no_weight_decay():
    model = _gpt()
    decay, no_decay = param_groups(model, _train(weight_decay=0.1))
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == {n for n in dict(model.named_parameters())
                                    if n.endswith("weight") and (".qkv." in n or ".proj." in n or ".mlp." in n
                                                                 or n == "head.weight")}
    assert {"tok.weight", "pos.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.1.mlp.0.bias",
            "ln_f.weight"} <= _names(model, no_decay)


def test_decay_exclude_rules_and_one_group_without_decay():
    model = _gpt()
    assert len(param_groups(model, _train(weight_decay=0.0))) == 1
    assert len(param_groups(model, _train(weight_decay=0.1, decay_exclude="[]"))) == 1
    _, ndim = param_groups(model, _train(weight_decay=0.1, decay_exclude="[1d]"))  # nanoGPT's rule
    assert _names(model, ndim) == {n for n, p in model.named_parameters() if p.dim() < 2}
    _, globbed = param_groups(model, _train(weight_decay=0.1, decay_exclude="['*.pos.weight','pos.*']"))
    assert _names(model, globbed) == {"pos.weight"}


def test_a_tied_weight_is_excluded_when_any_of_its_holders_is():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.tok.weight

    model = Tied()
    groups = param_groups(model, _train(weight_decay=0.1))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and _names(model, groups[0]) == {"tok.weight"}


def test_fused_on_cuda_by_default_and_any_implementation_on_request():
    assert implementation_kwargs(_train(), torch.device("cpu")) == {}
    assert implementation_kwargs(_train(), torch.device("cuda")) == {"fused": True}
    assert implementation_kwargs(_train(optimizer_impl="foreach"), torch.device("cuda")) == {"foreach": True}
    assert implementation_kwargs(_train(optimizer_impl="for_loop"), torch.device("cuda")) == {"foreach": False}
    # torch's fused kernels run on CPU too: the same update as the loop, to float rounding
    steps = {}
    for impl in ("fused", "for_loop"):
        torch.manual_seed(0)
        model = _gpt()
        train = _train(optimizer_impl=impl, weight_decay=0.1)
        optimizer = build_optimizer(param_groups(model, train), train, torch.device("cpu"))
        assert optimizer.defaults.get("fused") is (True if impl == "fused" else None)
        for _ in range(3):
            model(torch.randint(0, 98, (2, 16))).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        steps[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(steps["fused"], steps["for_loop"], rtol=1e-5, atol=1e-7)


def test_checkpoints_hold_the_same_groups_under_every_strategy_and_ddp_is_skipped_at_world_size_1(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    from distrain.training.trainer import Trainer

    groups = {}
    for strategy in ("ddp", "zero1", "fsdp", "accelerate"):
        overrides = ["train.global_batch=8", "train.micro_batch=4", "train.steps=1", "train.eval_every=0",
                     "data.kwargs.max_chars=20000", "metrics.progress=none", f"run.dir={tmp_path}",
                     f"run.name={strategy}", "checkpoint.at_end=false", f"strategy.name={strategy}"]
        with Trainer("configs/gpt.yaml", overrides=overrides) as trainer:
            trainer.fit()
            saved = trainer.strategy.checkpoint_state()["optim"]["param_groups"]
            groups[strategy] = [(g["weight_decay"], sorted(g["params"])) for g in saved]
            if strategy in ("ddp", "zero1"):  # world size 1: no buckets, no hooks, no bytes on a wire
                assert not isinstance(trainer.strategy.model, DistributedDataParallel)
                assert trainer.strategy.comm_bytes == 0
    assert [wd for wd, _ in groups["ddp"]] == [0.1, 0.0]
    for strategy, found in groups.items():
        assert found == groups["ddp"], strategy


def test_bad_optimizer_settings_name_the_key():
    from distrain.errors import ConfigError

    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        load_config("configs/gpt.yaml", ["train.optimizer_impl=apex"])
    with pytest.raises(ConfigError, match="train.decay_exclude"):
        load_config("configs/gpt.yaml", ["train.decay_exclude=['']"])
    assert OmegaConf.to_container(load_config(None).train.decay_exclude) == ["bias", "norm", "embedding"]
