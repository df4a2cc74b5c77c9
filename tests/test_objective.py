"""The objective is the global-batch mean over valid items, for any model, loss and step, at any scale.

One torchrun launch per world size (1, 2, 3) trains every case (tests/workers/objective_worker.py): a transformers GPT-2
(tiny, random init) on padded variable-length dict samples with its own ``.loss``, and the built-in gpt on padded
text with the built-in loss, each 10 SGD steps of a global batch of 12 in micro-batches of 2 (W=1 accumulates 6,
W=2 3, W=3 2). Every world size must land on the parameters of plain full-batch training (one forward over all 12
sequences, the model's own mean over valid tokens), computed here in this process, within 1e-5 relative. At W=2
the same GPT-2 runs under every other strategy, resumes from a checkpoint, and distils from a frozen teacher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import run_cli, run_torchrun
from objective_cases import (GPT_PADDED, HF_COMMON, VOCAB, PaddedTokens, full_batch_reference, gpt2, hf_own_loss,
                             padded_lm_loss)
from distrain.errors import ConfigError
from distrain.verify import WorldResult, compare, read_world

DDP = ["strategy.name=ddp"]
STRATEGIES = {  # at W=2 against the full-batch reference, like ddp
    "hf-fsdp": ["strategy.name=fsdp"],
    "hf-zero1": ["strategy.name=zero1"],
    "hf-deepspeed-2": ["strategy.name=deepspeed", "strategy.kwargs.stage=2"],
    "hf-deepspeed-3": ["strategy.name=deepspeed", "strategy.kwargs.stage=3"],
    "hf-accelerate": ["strategy.name=accelerate"],
}
RUNS: List[dict] = [
    {"name": "hf", "kind": "hf", "overrides": HF_COMMON + DDP, "worlds": [1, 2, 3]},
    {"name": "hf-mb12", "kind": "hf", "overrides": HF_COMMON + DDP + ["train.micro_batch=12"], "worlds": [1]},
    {"name": "gpt", "kind": "gpt", "overrides": HF_COMMON + DDP + GPT_PADDED, "worlds": [1, 2, 3]},
    {"name": "gpt-mb12", "kind": "gpt", "overrides": HF_COMMON + DDP + GPT_PADDED + ["train.micro_batch=12"],
     "worlds": [1]},
    *[{"name": name, "kind": "hf", "overrides": HF_COMMON + o, "worlds": [2]} for name, o in STRATEGIES.items()],
    {"name": "hf-local-sgd", "kind": "hf", "overrides": HF_COMMON + ["strategy.name=local_sgd"], "worlds": [2]},
    {"name": "hf-half", "kind": "hf", "overrides": HF_COMMON + DDP + ["train.steps=5", "checkpoint.every=5"],
     "worlds": [2]},
    {"name": "hf-resumed", "kind": "hf", "overrides": HF_COMMON + DDP + ["checkpoint.every=5"], "worlds": [2],
     "continues": "hf-half"},
    {"name": "distill-ddp", "kind": "distill", "overrides": HF_COMMON + DDP, "worlds": [2], "probe": True},
    {"name": "distill-fsdp", "kind": "distill", "overrides": HF_COMMON + ["strategy.name=fsdp"], "worlds": [2],
     "probe": True},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Dict[str, Dict[int, dict]]:
    pytest.importorskip("transformers", reason="the Hugging Face cases need pip install 'distrain[hf]'")
    out = tmp_path_factory.mktemp("objective")
    (out / "runs.json").write_text(json.dumps(RUNS))
    for world in (1, 2, 3):
        proc = run_torchrun(world, ["tests/workers/objective_worker.py", str(out), str(out / "runs.json")], timeout=900)
        errors = [line for line in proc.stderr.splitlines() if "Error" in line and "Warning" not in line]
        assert proc.returncode == 0, f"W={world} failed:\n" + "\n".join(errors[-10:] or proc.stderr.splitlines()[-30:])
    collected: Dict[str, Dict[int, dict]] = {}
    for run in RUNS:
        for world in run["worlds"]:
            collected.setdefault(run["name"], {})[world] = _load(out / run["name"] / f"w{world}", world)
    return collected


def _load(run_dir: Path, world: int) -> dict:
    return {**json.loads((run_dir / "result.json").read_text()), "result": read_world(run_dir, world)}


def _as_result(weights: Dict[str, torch.Tensor]) -> WorldResult:
    return WorldResult(world_size=1, grad_accum=1, final_loss=0.0, weights=weights, indices=[])


@pytest.fixture(scope="module")
def hf_reference() -> WorldResult:
    pytest.importorskip("transformers", reason="the Hugging Face cases need pip install 'distrain[hf]'")
    return _as_result(full_batch_reference(gpt2(), PaddedTokens(), steps=10, global_batch=12, lr=0.5,
                                           loss_of=hf_own_loss))


@pytest.fixture(scope="module")
def gpt_reference() -> WorldResult:
    from distrain.config import load_config
    from distrain.data import build_datasets
    from distrain.models import build_model

    cfg = load_config(None, GPT_PADDED)
    train, _ = build_datasets(cfg.data.name, cfg.data.kwargs, 0.1)
    torch.manual_seed(cfg.run.seed)  # as the Trainer seeds before building a model
    model = build_model(cfg.model.name, cfg.model.kwargs, train.spec)
    return _as_result(full_batch_reference(model, train, steps=10, global_batch=12, lr=0.5, loss_of=padded_lm_loss))


def _rel(results, reference: WorldResult, name: str, world: int) -> float:
    return compare(reference, results[name][world]["result"]).max_rel_diff


# The tests on the `results` fixture (15 trainings, ~90 s) run with -m slow (CI), to keep the default run under 15
# minutes on 2 cores.
# --- exact token-level normalisation ----------------------------------------------------------------------
@pytest.mark.slow
def test_hf_gpt2_at_w1_w2_w3_equals_full_batch_training_with_its_own_loss(results, hf_reference):
    assert [results["hf"][w]["grad_accum"] for w in (1, 2, 3)] == [6, 3, 2]
    for world in (1, 2, 3):
        rel = _rel(results, hf_reference, "hf", world)
        assert rel <= 1e-5, f"HF GPT-2 at W={world} differs from full-batch training by {rel:.3e} (relative)"
    assert results["hf"][2]["result"].indices == results["hf"][1]["result"].indices == \
        results["hf"][3]["result"].indices


@pytest.mark.slow
def test_hf_gpt2_micro_batch_12_and_2_agree(results, hf_reference):
    assert results["hf-mb12"][1]["grad_accum"] == 1
    assert compare(results["hf-mb12"][1]["result"], results["hf"][1]["result"]).max_rel_diff <= 1e-5
    assert _rel(results, hf_reference, "hf-mb12", 1) <= 1e-5


@pytest.mark.slow
def test_builtin_gpt_on_padded_text_equals_full_batch_training(results, gpt_reference):
    for name, world in (("gpt", 1), ("gpt", 2), ("gpt", 3), ("gpt-mb12", 1)):
        rel = _rel(results, gpt_reference, name, world)
        assert rel <= 1e-5, f"built-in gpt ({name}) at W={world} differs from full-batch training by {rel:.3e}"


@pytest.mark.slow
def test_logged_loss_is_the_global_mean_at_every_world_size(results):
    losses = [results["hf"][w]["loss"] for w in (1, 2, 3)] + [results["hf-mb12"][1]["loss"]]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])


# --- every strategy, checkpoints, export ------------------------------------------------------------------
@pytest.mark.slow
def test_hf_gpt2_trains_exactly_under_every_strategy(results, hf_reference):
    for name in STRATEGIES:
        rel = _rel(results, hf_reference, name, 2)
        assert rel <= 1e-5, f"{name} at W=2 differs from full-batch training by {rel:.3e}"
    local = results["hf-local-sgd"][2]["loss"]  # not exact by design (ranks drift between averages), but trains
    assert math.isfinite(local) and abs(local - results["hf"][2]["loss"]) <= 0.05 * results["hf"][2]["loss"]


@pytest.mark.slow
def test_hf_gpt2_resumes_exactly_from_its_checkpoint(results):
    assert results["hf-half"][2]["steps"] == 5 and results["hf-resumed"][2]["steps"] == 10
    assert compare(results["hf"][2]["result"], results["hf-resumed"][2]["result"]).max_rel_diff <= 1e-6


# --- a frozen teacher -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill-ddp", "distill-fsdp"])
def test_frozen_teacher_is_never_wrapped_trained_checkpointed_or_exported(results, name):
    student_shapes = {k: list(v.shape) for k, v in gpt2().state_dict().items()}
    teacher_shapes = {k: list(v.shape) for k, v in gpt2(layers=3, seed=1).state_dict().items()}
    assert set(teacher_shapes) - set(student_shapes), "the teacher must have tensors the student lacks"
    facts = results[name][2]["probe"]
    for rank in facts:
        assert rank["teacher_class"] == "GPT2LMHeadModel"  # not DDP, not FSDP's in-place subclass
        assert not rank["teacher_sharded"] and not rank["teacher_in_optimizer"]
        assert not rank["teacher_training"] and not rank["teacher_requires_grad"] and not rank["teacher_changed"]
        assert rank["teacher_device"] == "cpu"
    checkpoint = facts[0]["checkpoint_model_shapes"]
    export = facts[0]["export_shapes"]
    assert set(export) == set(student_shapes) and all(export[k] == student_shapes[k] for k in export)
    assert set(checkpoint) <= set(student_shapes)  # DCP keeps one name of the tied embedding
    assert all(checkpoint[k] == student_shapes[k] for k in checkpoint)
    student = results[name][2]["result"].weights
    assert set(student) == set(student_shapes)


@pytest.mark.slow
def test_distillation_moves_the_student_and_evaluates_with_the_metric_hook(results):
    scores = results["distill-ddp"][2]["eval"]
    assert set(scores) == {"eval_loss", "eval_accuracy", "eval_ce"}
    assert 0 < scores["eval_ce"] < 4.2 and 0 <= scores["eval_accuracy"] <= 1  # ln 64 = 4.16 at random init
    fsdp = results["distill-fsdp"][2]
    assert compare(results["distill-ddp"][2]["result"], fsdp["result"]).max_rel_diff <= 1e-5


# --- evaluation of any output -----------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_of_model_outputs_is_the_training_objective_over_the_eval_set(results):
    """A transformers ModelOutput is evaluated (it crashed before): eval_loss equals the model's own mean over
    every valid label of the eval set in one forward, and accuracy is over the same shifted labels."""
    from distrain.data import fetch_batch

    data = PaddedTokens(24, seed=1)
    whole = fetch_batch(data, list(range(len(data))))
    labels = whole["labels"][:, 1:]
    valid = labels != -100
    for world in (1, 2, 3):
        model = gpt2()
        model.load_state_dict(results["hf"][world]["result"].weights)
        with torch.no_grad():
            outputs = model.eval()(**whole)
        accuracy = float(((outputs.logits[:, :-1].argmax(-1) == labels) & valid).sum() / valid.sum())
        scores = results["hf"][world]["eval"]
        assert scores["eval_loss"] == pytest.approx(float(outputs.loss), rel=1e-5)
        assert scores["eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)


# --- in one process: counting, the loss contract and bad inputs ----------------------------------------------
class KeywordLM(nn.Module):
    """A Hugging Face-style model that is not from transformers: forward(input_ids, labels) -> {loss, logits}."""

    def __init__(self, returns_loss: bool = True, sums: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        self.returns_loss = returns_loss
        if sums:  # declare the transformers convention: the loss divides its sum by num_items_in_batch
            self.forward = self.forward_summing

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        if labels is None or not self.returns_loss:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}

    def forward_summing(self, input_ids, labels=None, num_items_in_batch=None):
        logits = self.head(self.embed(input_ids))
        summed = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return {"loss": summed / num_items_in_batch, "logits": logits}


class Unlabelled(Dataset):
    def __init__(self, n: int = 24, labels: bool = False, all_padding_from: int = 99):
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(0))
        self.labels, self.all_padding_from = labels, all_padding_from

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if not self.labels:
            return {"input_ids": self.ids[i]}
        labels = self.ids[i] if i < self.all_padding_from else torch.full((8,), -100)
        return {"input_ids": self.ids[i], "labels": labels, "sample_id": i}


def _trainer(tmp_path, **kwargs):
    from distrain.training.trainer import Trainer

    overrides = [f"run.dir={tmp_path}", "run.name=t", "strategy.name=single", "train.global_batch=8",
                 "train.micro_batch=4", "train.steps=2", "checkpoint.at_end=false", "metrics.progress=none",
                 "train.optimizer=sgd", "train.lr=0.1"]
    return Trainer(overrides=overrides, **kwargs)


def _fit_error(tmp_path, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        with _trainer(tmp_path, **kwargs) as trainer:
            trainer.fit()
    return str(err.value)


def test_a_model_that_returns_no_loss_without_a_loss_fn_is_refused(tmp_path):
    message = _fit_error(tmp_path, model=KeywordLM(returns_loss=False), train_data=Unlabelled(labels=True))
    assert "no loss" in message and "keys ['logits']" in message and "loss_fn" in message


def test_pair_data_without_a_loss_is_refused_before_training(tmp_path):
    pairs = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    with pytest.raises(ConfigError, match="No loss function"):
        _trainer(tmp_path, model=nn.Linear(3, 1), train_data=pairs)


def test_a_batch_without_labels_cannot_be_counted(tmp_path):
    message = _fit_error(tmp_path, model=KeywordLM(), train_data=Unlabelled(labels=False))
    assert "no 'labels'" in message and "['input_ids']" in message and "items='samples'" in message


def test_a_loss_that_is_not_a_scalar_is_refused(tmp_path):
    data = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    message = _fit_error(tmp_path, model=nn.Linear(3, 2), train_data=data,
                         loss_fn=lambda out, target: F.cross_entropy(out, target, reduction="none"))
    assert "not a scalar" in message and "shape (4,)" in message and "num_items_in_batch" in message


def test_a_mean_loss_over_an_all_padding_micro_batch_is_refused(tmp_path):
    data = Unlabelled(labels=True, all_padding_from=0)
    message = _fit_error(tmp_path, model=KeywordLM(), train_data=data)
    assert "no valid items" in message and "rank 0" in message and "num_items_in_batch" in message


def test_a_summing_model_trains_through_all_padding_micro_batches(tmp_path):
    """With num_items_in_batch a micro-batch of padding only adds nothing: no 0/0 anywhere."""
    data = Unlabelled(labels=True, all_padding_from=12)
    with _trainer(tmp_path, model=KeywordLM(sums=True), train_data=data) as trainer:
        assert math.isfinite(trainer.fit()["loss"])


@pytest.mark.parametrize("frozen, step, fragment", [
    ({"teacher": nn.Linear(3, 1, device="meta")}, "teacher", "meta device"),
    ({"teacher": nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1, device="meta"))}, "teacher", "meta device"),
    ({"teacher": "not a module"}, "teacher", "must be nn.Modules"),
    ({"critic": nn.Linear(3, 1)}, "teacher", "does not take a 'critic' argument"),
])
def test_bad_frozen_modules_are_refused(tmp_path, frozen, step, fragment):
    def step_fn(model, batch, teacher):
        return F.mse_loss(model(batch[0]), batch[1])

    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    with pytest.raises(ConfigError, match=fragment):
        _trainer(tmp_path, model=nn.Linear(3, 1), train_data=data, step_fn=step_fn, frozen=frozen)


def test_a_teacher_spread_over_devices_or_sharing_the_students_weights_is_refused(tmp_path):
    from distrain.training.objective import freeze

    student = nn.Linear(3, 1)

    def step_fn(model, batch, teacher):
        return model(batch[0]).sum()

    with pytest.raises(ConfigError, match="shares parameters"):
        freeze({"teacher": nn.Sequential(student)}, torch.device("cpu"), student, step_fn)
    spread = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    spread[1].register_buffer("scale", torch.ones(1, device="meta"))
    with pytest.raises(ConfigError, match="meta"):
        freeze({"teacher": spread}, torch.device("cpu"), student, step_fn)
    with pytest.raises(ConfigError, match="no step_fn"):
        freeze({"teacher": nn.Linear(3, 1)}, torch.device("cpu"), student, None)


def test_a_frozen_teacher_stays_in_eval_mode_without_gradients_and_out_of_the_optimizer(tmp_path):
    teacher = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    def step_fn(model, batch, teacher):
        inputs, targets = batch
        soft = teacher(inputs)
        seen.append((teacher.module.training, soft.requires_grad))
        teacher.module.train()  # even if the step flips it, the next call runs in eval mode again
        return F.mse_loss(model(inputs), 0.5 * targets + 0.5 * soft)

    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    with _trainer(tmp_path, model=nn.Linear(3, 1), train_data=data, step_fn=step_fn,
                  frozen={"teacher": teacher}) as trainer:
        trainer.fit()
        optimized = {id(p) for group in trainer.strategy.optimizer.param_groups for p in group["params"]}
        state = trainer.strategy.checkpoint_state()["model"]
    assert seen and all(not training and not grad for training, grad in seen)
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert set(state) == {"weight", "bias"}
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_forward_keys_the_model_does_not_take_are_not_passed(tmp_path):
    data = Unlabelled(labels=True)  # samples also carry "sample_id", which KeywordLM.forward does not take
    with _trainer(tmp_path, model=KeywordLM(), train_data=data) as trainer:
        assert math.isfinite(trainer.fit()["loss"])


def test_transformers_causal_lm_items_are_the_shifted_labels():
    pytest.importorskip("transformers")
    from distrain.training.objective import Objective

    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    objective = Objective(gpt2(), torch.device("cpu"), global_batch=2, sample=lambda: batch)
    assert objective.items == "labels" and objective.shift and objective.sums
    assert int(objective.count(batch)) == 2  # position 0 of every row is never predicted
    plain = Objective(KeywordLM(), torch.device("cpu"), global_batch=2, sample=lambda: batch)
    assert int(plain.count(batch)) == 4 and not plain.shift and not plain.sums


def test_accuracy_skips_ignored_labels_and_needs_logits():
    from distrain.training.objective import correct_and_count

    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    assert correct_and_count(logits, torch.tensor([[1, 1, -100]])) == (1, 2)
    assert correct_and_count(logits, torch.tensor([[0, -100]]), shift=True) == (0, 1)  # position 0 predicts 1
    assert correct_and_count(None, torch.tensor([1])) is None
    assert correct_and_count(torch.tensor(0.5), torch.tensor([[1]])) is None  # a loss is no logits


def test_the_builtin_lm_loss_sums_over_valid_tokens():
    from distrain.training.losses import sequence_cross_entropy

    logits, targets = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, -100, -100, -100, -100]])
    mean = sequence_cross_entropy(logits, targets)
    assert torch.allclose(sequence_cross_entropy(logits, targets, num_items_in_batch=4) * 4, mean * 4)
    assert torch.allclose(sequence_cross_entropy(logits, targets, num_items_in_batch=8), mean / 2)


# --- distrain verify for a user's model and loss ------------------------------------------------------------
VERIFY = ["verify", "configs/mlp.yaml", "--steps", "10", "--full-batch", "train.global_batch=12",
          "train.micro_batch=2", "train.optimizer=sgd", "train.lr=0.5", "train.warmup_steps=0", "train.grad_clip=0"]


def test_verify_proves_a_users_model_and_loss_against_full_batch_training():
    proc = run_cli([*VERIFY, "--worlds", "2", "--trainer-args", "objective_cases:user_lm_args"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "against one rank on the whole global batch" in proc.stdout and "OK" in proc.stdout
    assert proc.stdout.count(" ok") == 2  # the full-batch reference and W=2 (accumulating 3 micro-batches)


@pytest.mark.slow  # two more launches; the acceptance tests above already fail on such an objective
def test_verify_catches_a_loss_whose_objective_changes_with_micro_batch():
    """A per-micro-batch token mean declared per-sample: every world size agrees, full-batch training does not."""
    proc = run_cli([*VERIFY, "--worlds", "1", "--trainer-args", "objective_cases:user_lm_per_sample_args"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCH" in proc.stdout and "FAILED" in proc.stdout


def test_verify_names_a_trainer_args_function_that_does_not_exist():
    proc = run_cli([*VERIFY, "--worlds", "1", "--trainer-args", "objective_cases:nope"])
    assert proc.returncode == 2 and "has no function 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_builtin_text_counts_its_tokens_without_a_collective_unless_padded():
    from distrain.data import build_datasets
    from distrain.training.losses import default_items
    from distrain.training.objective import Objective

    plain, _ = build_datasets("text", {"block_size": 8, "max_chars": 2000}, 0.1)
    padded, _ = build_datasets("text", {"block_size": 8, "max_chars": 2000, "min_length": 2}, 0.1)
    assert default_items(plain.spec) == "elements" and default_items(padded.spec) == "labels"
    batches = [plain[:3], plain[3:6]]
    objective = Objective(nn.Linear(1, 1), torch.device("cpu"), global_batch=12, default_items="elements")
    assert objective.static_count and objective.step_counts(batches) == ([24, 24], 96)
    assert bool((padded.targets == -100).any()) and not bool((plain.targets == -100).any())


@pytest.mark.slow  # three short trainings on 2 ranks (~1 min); README has the full run's numbers
def test_distillation_example_runs_on_two_ranks(repo, tmp_path):
    proc = run_torchrun(2, [str(repo / "examples" / "distill.py"), "--teacher-steps", "4", "--steps", "4",
                            "--runs", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(scores) == {"teacher_eval_ce", "student_with_teacher_eval_ce", "student_alone_eval_ce"}
    assert all(math.isfinite(v) for v in scores.values())
