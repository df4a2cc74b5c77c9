import pytest
import torch

from distrain.data import build_datasets, decode, encode, fetch_batch
from distrain.errors import ConfigError
from distrain.training.losses import correct_and_count, default_loss
from distrain.models import MODELS, build_model


def test_digits_are_real_and_split():
    train, evaluation = build_datasets("digits", {}, 0.2)
    assert len(train) + len(evaluation) == 1797 and len(evaluation) == 359
    x, y = fetch_batch(train, [0, 1, 2])
    assert x.shape == (3, 1, 8, 8) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    assert set(train.targets.tolist()) == set(range(10))


def test_text_is_the_stdlib_source_with_a_fixed_vocab():
    train, evaluation = build_datasets("text", {"block_size": 32, "max_chars": 20000}, 0.1)
    x, y = fetch_batch(train, [0])
    assert x.shape == (1, 32) and torch.equal(x[0, 1:], y[0, :-1])
    assert "import" in decode(train.inputs[:200].flatten())
    assert decode(encode("def f():\n\treturn 1")) == "def f():\n\treturn 1"
    assert train.spec.num_classes == 98 and len(evaluation) > 0


def test_regression_and_unknown_dataset():
    train, _ = build_datasets("regression", {"num_samples": 100, "dim": 4}, 0.2)
    assert len(train) == 80 and train.spec.task == "regression"
    with pytest.raises(ConfigError, match="data.name"):
        build_datasets("imagenet", {}, 0.2)
    with pytest.raises(ConfigError, match="data.kwargs"):
        build_datasets("digits", {"resolution": 4}, 0.2)


def test_user_dataset_fetch_uses_default_collate():
    data = [(torch.tensor([float(i)]), i % 2) for i in range(10)]
    x, y = fetch_batch(data, [1, 3])
    assert x.shape == (2, 1) and y.tolist() == [1, 1]


@pytest.mark.parametrize("model, data, kwargs", [("mlp", "digits", {}), ("cnn", "digits", {}),
                                                  ("mlp", "regression", {"num_samples": 64}),
                                                  ("lstm", "text", {"max_chars": 5000}),
                                                  ("gpt", "text", {"max_chars": 5000})])
def test_every_builtin_model_learns_a_step(model, data, kwargs):
    torch.manual_seed(0)
    train, _ = build_datasets(data, kwargs, 0.1)
    net = build_model(model, {}, train.spec)
    x, y = fetch_batch(train, list(range(8)))
    loss_fn = default_loss(train.spec.task)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = loss_fn(net(x), y)
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    assert loss_fn(net(x), y) < first


def test_model_errors_name_the_key():
    train, _ = build_datasets("digits", {}, 0.2)
    with pytest.raises(ConfigError, match="model.name"):
        build_model("resnet", {}, train.spec)
    with pytest.raises(ConfigError, match="model.kwargs.width"):
        build_model("mlp", {"width": 3}, train.spec)
    with pytest.raises(ConfigError, match="model.kwargs"):
        build_model("gpt", {}, train.spec)
    assert set(MODELS) >= {"mlp", "cnn", "lstm", "gpt"}


def test_accuracy_only_for_class_logits():
    assert correct_and_count(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == (1, 2)
    assert correct_and_count(torch.zeros(4, 1), torch.zeros(4, 1)) is None
