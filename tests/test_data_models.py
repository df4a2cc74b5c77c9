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


def test_an_error_inside_a_builder_is_the_builders_not_a_kwargs_mismatch(monkeypatch):
    """A TypeError raised *inside* a builder is a bug in it, raised as is; only a call that does not fit the
    builder's signature (a missing or unknown argument) is a config error about the kwargs."""
    from distrain.data.datasets import DATASETS

    train, _ = build_datasets("digits", {}, 0.2)

    def buggy_model(spec, size: int = 3):
        return None + size  # TypeError inside the builder

    def needs_size(spec, size: int):
        return torch.nn.Linear(64, size)

    monkeypatch.setitem(MODELS, "buggy", buggy_model)
    monkeypatch.setitem(MODELS, "needs-size", needs_size)
    with pytest.raises(TypeError, match="NoneType"):
        build_model("buggy", {}, train.spec)
    with pytest.raises(ConfigError, match="model 'needs-size' needs model.kwargs.size"):
        build_model("needs-size", {}, train.spec)

    def buggy_data(eval_fraction: float = 0.2):
        return len(None), eval_fraction

    def needs_path(path: str, eval_fraction: float = 0.2):
        raise AssertionError("not reached")

    monkeypatch.setitem(DATASETS, "buggy", buggy_data)
    monkeypatch.setitem(DATASETS, "needs-path", needs_path)
    with pytest.raises(TypeError, match="NoneType"):
        build_datasets("buggy", {}, 0.2)
    with pytest.raises(ConfigError, match="dataset 'needs-path' needs data.kwargs.path"):
        build_datasets("needs-path", {}, 0.2)


@pytest.mark.parametrize("model, kwargs, key", [("mlp", {"hidden": -5}, "hidden"), ("mlp", {"depth": -1}, "depth"),
                                                ("cnn", {"channels": 0}, "channels"), ("mlp", {"hidden": 2.5}, "hidden")])
def test_builtin_model_sizes_out_of_range_name_the_key(model, kwargs, key):
    train, _ = build_datasets("digits", {}, 0.2)
    with pytest.raises(ConfigError, match=f"model.kwargs.{key}") as err:
        build_model(model, kwargs, train.spec)
    assert err.value.key == f"model.kwargs.{key}"


def test_a_dict_sample_error_lists_every_accepted_key_pair():
    from distrain.data.batches import SAMPLE_KEYS, split_input_target

    assert split_input_target({"x": 1, "y": 2}) == (1, 2) and split_input_target({"inputs": 1, "labels": 2}) == (1, 2)
    with pytest.raises(TypeError) as err:
        split_input_target({"image": 1, "label": 2})
    for a, b in SAMPLE_KEYS:
        assert f"'{a}'/'{b}'" in str(err.value)
    assert "['image', 'label']" in str(err.value)
