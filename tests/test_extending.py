"""One way to extend (docs/architecture.md, "Adding a strategy / environment / dataset / tracker / model"): a
module outside the package, named by ``package.module:object`` from YAML and overrides, trains a step or two."""

from __future__ import annotations

import json
import textwrap

import pytest

import distrain
from distrain.env import detect, preempted_exit_code
from distrain.errors import ConfigError

USER_MODULE = '''
import json
from pathlib import Path

import torch
from torch import nn

from distrain.data import DataSpec, TensorPairDataset
from distrain.env import ClusterEnvironment, ProcessInfo
from distrain.strategies import Strategy
from distrain.telemetry.trackers import Tracker


class PlainStrategy(Strategy):
    """No wrapper at all: the model on the device and the run's optimizer."""
    name = "plain"
    needs_process_group = False

    def setup(self, model):
        self.model = model.to(self.ctx.device)
        self.optimizer = self._build_optimizer(self.model)


def make_net(spec, hidden: int = 8):
    return nn.Sequential(nn.Linear(spec.input_shape[0], hidden), nn.Tanh(), nn.Linear(hidden, spec.output_dim))


def make_sets(eval_fraction: float, samples: int = 48, dim: int = 4):
    x = torch.randn(samples, dim, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True)
    spec = DataSpec(task="regression", input_shape=(dim,), output_dim=1)
    cut = int(samples * (1 - eval_fraction))
    return TensorPairDataset(x[:cut], y[:cut], spec), TensorPairDataset(x[cut:], y[cut:], spec)


class FileTracker(Tracker):
    """Writes every metrics record it gets to a JSON-lines file beside the run."""
    name = "file"

    def start(self, run):
        self.path = Path(run.run_dir) / "file_tracker.jsonl"
        return "file-run"

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\\n")

    def finish(self, end):
        with open(self.path, "a") as f:
            f.write(json.dumps({"end": end.status}) + "\\n")


class MyCluster(ClusterEnvironment):
    name = "mycluster"
    preempted_exit_code = 99

    @staticmethod
    def detect(environ):
        return "MYCLUSTER_RANK" in environ

    @staticmethod
    def info(environ):
        return ProcessInfo(rank=int(environ["MYCLUSTER_RANK"]), local_rank=0, world_size=int(environ["MYCLUSTER_SIZE"]),
                           local_world_size=1, master_addr="node0", master_port=29500, source="mycluster")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``myext``, a module of the user's own on sys.path (as PYTHONPATH would put it for every rank)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "myext.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return "myext"


def test_a_strategy_model_dataset_and_tracker_of_ones_own_train_by_name_from_yaml(tmp_path, user_module):
    config = tmp_path / "own.yaml"
    config.write_text(textwrap.dedent(f"""\
        run: {{dir: {tmp_path / "runs"}, name: own}}
        strategy: {{name: "{user_module}:PlainStrategy"}}
        model: {{name: "{user_module}:make_net", kwargs: {{hidden: 6}}}}
        data: {{name: "{user_module}:make_sets", num_workers: 0}}
        train: {{global_batch: 8, steps: 2, log_every: 1}}
        metrics: {{progress: none}}
        """))
    cfg = distrain.load_config(str(config), [f"metrics.trackers=[{user_module}:FileTracker]", "data.kwargs.dim=3"])
    with distrain.Trainer(cfg) as trainer:
        trainer.fit()
        assert type(trainer.strategy).__name__ == "PlainStrategy"
        assert trainer.strategy.module[0].in_features == 3 and trainer.strategy.module[0].out_features == 6
    records = [json.loads(line) for line in (tmp_path / "runs" / "own" / "file_tracker.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and records[-1] == {"end": "finished"}


def test_an_environment_of_ones_own_is_detected_from_its_variables(user_module, monkeypatch):
    monkeypatch.setenv("DISTRAIN_ENVIRONMENTS", f"{user_module}:MyCluster")
    monkeypatch.setenv("MYCLUSTER_RANK", "2")
    monkeypatch.setenv("MYCLUSTER_SIZE", "4")
    info = detect()
    assert (info.source, info.rank, info.world_size, info.master_addr) == ("mycluster", 2, 4, "node0")
    assert preempted_exit_code(info) == 99  # the environment says how a preempted process ends
    monkeypatch.delenv("MYCLUSTER_RANK")
    assert detect().source == "single"  # its variables unset: it does not answer


@pytest.mark.parametrize("override, key", [
    ("model.name={m}:no_such_builder", "model.name"),
    ("data.name={m}:no_such_sets", "data.name"),
    ("strategy.name={m}:make_net", "strategy.name"),  # imports, but is no Strategy subclass
    ("metrics.trackers=[{m}:make_sets]", "metrics.trackers"),
])
def test_a_path_that_is_not_what_its_key_needs_is_refused_naming_the_key(tmp_path, user_module, override, key):
    overrides = [f"run.dir={tmp_path}", "train.steps=1", "metrics.progress=none", override.format(m=user_module)]
    with pytest.raises(ConfigError) as err:
        with distrain.Trainer(distrain.load_config(None, overrides)) as trainer:
            trainer.fit()
    assert err.value.key == key and key in str(err.value) and "\n" not in str(err.value)


def test_an_environment_path_that_does_not_import_is_refused(monkeypatch):
    monkeypatch.setenv("DISTRAIN_ENVIRONMENTS", "no_such_module_here:Cluster")
    with pytest.raises(ConfigError, match="DISTRAIN_ENVIRONMENTS='no_such_module_here:Cluster' cannot be loaded"):
        detect()
