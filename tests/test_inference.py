"""Export, predict and eval: the exported file and the checkpoint give exactly what the in-memory model gives."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import distrain
from conftest import REPO, run_cli_here, run_torchrun
from distrain.data import build_datasets, fetch_batch, split_input_target
from distrain.errors import CheckpointError
from distrain.training.trainer import Trainer

# DCP warns on every single-process save/load (strategy single), even when asked for one explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is (disabled, )?unavailable")

FAST = ["strategy.name=single", "metrics.progress=none", "train.eval_every=0"]
INDICES = [0, 5, 17, 100]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A trained CNN on digits (saved at the end), with its in-memory predictions for INDICES of the eval split."""
    root = tmp_path_factory.mktemp("digits")
    with Trainer(str(REPO / "configs" / "cnn.yaml"), overrides=[f"run.dir={root}", "run.name=cnn", "train.steps=12",
                                                                 "train.micro_batch=64", *FAST]) as trainer:
        trainer.fit()
        model = trainer.strategy.module.eval()
        inputs, _ = split_input_target(fetch_batch(trainer.eval_data, INDICES))
        with torch.no_grad():
            logits = model(inputs)
        scores = trainer.evaluate()
    return root / "cnn", inputs, logits, scores


def test_export_then_predict_matches_the_in_memory_model(digits_run, tmp_path, capsys):
    run_dir, inputs, logits, _ = digits_run
    out = tmp_path / "cnn.safetensors"
    code, _, err = run_cli_here(["ckpt", "export", run_dir, "--out", out], capsys)
    assert code == 0, err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == {"source": "config", "name": "cnn", "kwargs": {"channels": 32, "hidden": 128}}
    assert meta["data"]["name"] == "digits" and meta["data_spec"]["num_classes"] == 10 and meta["step"] == 12

    probs = torch.softmax(logits, dim=-1)
    expected = [f"eval[{i}]: predicted {int(p.argmax())} (p={float(p.max()):.3f}), true " for i, p in zip(INDICES, probs)]
    for source in (out, run_dir):  # the export and the checkpoint itself
        args = ["predict", str(source)] + [a for i in INDICES for a in ("--index", str(i))]
        code, stdout, err = run_cli_here(args, capsys)
        assert code == 0, err
        lines = stdout.splitlines()
        assert [line[:len(e)] for line, e in zip(lines, expected)] == expected

    exported = distrain.load_model(out)  # the Python API: bit-identical logits
    with torch.no_grad():
        assert torch.equal(exported(inputs), logits)
    classes, confidence = distrain.classify(exported, inputs)
    assert classes.tolist() == logits.argmax(-1).tolist()


def test_eval_command_reproduces_trainer_evaluate(digits_run, tmp_path, capsys):
    run_dir, _, _, scores = digits_run
    code, stdout, err = run_cli_here(["eval", run_dir, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["step"] == 12 and result["checkpoint"].endswith("step_00000012")
    assert result["eval_loss"] == pytest.approx(scores["eval_loss"], rel=1e-6)
    assert result["eval_accuracy"] == scores["eval_accuracy"]
    # Under torchrun, sharded over 2 ranks and reduced.
    proc = run_torchrun(2, ["-m", "distrain", "eval", str(run_dir), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints the result
    result = json.loads(lines[0])
    assert result["eval_loss"] == pytest.approx(scores["eval_loss"], rel=1e-6)
    assert result["eval_accuracy"] == scores["eval_accuracy"]


def test_text_sampling_from_export_matches_in_memory(tmp_path, capsys):
    overrides = [f"run.dir={tmp_path}", "run.name=gpt", "train.steps=8", "train.global_batch=8", "train.micro_batch=8",
                 "model.kwargs.embed=32", "model.kwargs.heads=2", "model.kwargs.layers=1",
                 "data.kwargs.block_size=32", "data.kwargs.max_chars=40000", *FAST]
    with Trainer(str(REPO / "configs" / "gpt.yaml"), overrides=overrides) as trainer:
        trainer.fit()
        model = trainer.strategy.module.eval()
        text = distrain.generate_text(model, "def ", tokens=60, temperature=0.8, seed=3)
        greedy = distrain.generate_text(model, "import ", tokens=20, temperature=0)
    assert text.startswith("def ") and len(text) == 64
    out = tmp_path / "gpt.safetensors"
    assert run_cli_here(["ckpt", "export", tmp_path / "gpt", "--out", out], capsys)[0] == 0
    code, stdout, err = run_cli_here(["predict", out, "--prompt", "def ", "--tokens", "60", "--temperature", "0.8",
                                 "--seed", "3"], capsys)
    assert code == 0, err
    assert stdout == text + "\n"
    assert distrain.generate_text(distrain.load_model(out), "import ", tokens=20, temperature=0) == greedy
    code, _, err = run_cli_here(["predict", out, "--index", "3"], capsys)
    assert code == 2 and "--prompt" in err
    code, stdout, err = run_cli_here(["predict", out, "--prompt", "d\u00e9f \u2192 ", "--tokens", "3"], capsys)
    assert code == 0 and stdout.startswith("d\x00f \x00 ")  # read as the unknown character, as before
    assert err.splitlines() == ["distrain: warning: --prompt has 2 character(s) outside the model's vocabulary "
                                "('\u00e9', '\u2192'); each is read as the unknown character."]


def test_user_model_objects_load_with_load_weights(tmp_path):
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))

    train, _ = build_datasets("regression", {}, 0.2)
    overrides = [f"run.dir={tmp_path}", "run.name=user", "train.steps=3", "data.name=regression", *FAST]
    with Trainer(overrides=overrides, model=make(), train_data=train) as trainer:
        trainer.fit()
        weights = trainer.full_state_dict()
    with pytest.raises(CheckpointError, match="load_weights"):
        distrain.load_model(tmp_path / "user")
    mine = distrain.load_weights(make(), tmp_path / "user")
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in weights.items())
