import pytest
from omegaconf import OmegaConf

from distrain.config import batch_plan, config_hash, load_config, to_yaml
from distrain.errors import ConfigError


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg.train.optimizer == "adamw" and cfg.strategy.name == "ddp"


def test_yaml_and_overrides(tmp_path, repo):
    cfg = load_config(repo / "configs" / "quickstart.yaml", ["train.steps=7", "model.kwargs.hidden=16"])
    assert cfg.train.steps == 7 and cfg.model.kwargs.hidden == 16 and cfg.model.name == "cnn"


def test_dict_and_object_sources():
    assert load_config({"train": {"steps": 3}}).train.steps == 3
    from distrain.config import Config

    c = Config()
    c.train.lr = 0.5
    assert load_config(c).train.lr == 0.5


@pytest.mark.parametrize("source, overrides, key", [
    ({"train": {"stepz": 3}}, [], "train.stepz"),
    (None, ["train.bogus=1"], "train.bogus"),
    (None, ["nosuchsection.x=1"], "nosuchsection"),
    (None, ["train.steps=ten"], "train.steps"),
    (None, ["train.lr=abc"], "train.lr"),
    (None, ["train.steps=0"], "train.steps"),
    (None, ["train.global_batch=-4"], "train.global_batch"),
    (None, ["train.optimizer=lamb"], "train.optimizer"),
    (None, ["train.lr_schedule=linear"], "train.lr_schedule"),
    (None, ["train.betas=[0.9]"], "train.betas"),
    (None, ["dist.backend=mpi2"], "dist.backend"),
    (None, ["data.eval_fraction=1.5"], "data.eval_fraction"),
    (None, ["train.steps"], "train.steps"),
])
def test_bad_config_names_the_key(source, overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    assert key in str(info.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.stepz=3"])
    assert "global_batch" in str(info.value) and "steps" in str(info.value)


@pytest.mark.parametrize("g, m, w, accum", [(64, 32, 2, 1), (64, 8, 2, 4), (24, 4, 3, 2), (24, None, 3, 1),
                                            (12, 2, 1, 6)])
def test_batch_plan(g, m, w, accum):
    cfg = load_config(None, [f"train.global_batch={g}"] + ([f"train.micro_batch={m}"] if m else []))
    plan = batch_plan(cfg, w)
    assert plan.grad_accum == accum and plan.micro_batch * plan.grad_accum * plan.world_size == g


def test_batch_that_does_not_divide_names_three_numbers():
    cfg = load_config(None, ["train.global_batch=64", "train.micro_batch=12"])
    with pytest.raises(ConfigError) as info:
        batch_plan(cfg, 2)
    message = str(info.value)
    assert "64" in message and "12" in message and "2" in message and "train.micro_batch" in message
    with pytest.raises(ConfigError, match="world_size=3"):
        batch_plan(load_config(None, ["train.global_batch=64"]), 3)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_resolved_yaml_roundtrips_and_hash_ignores_volatile_keys():
    cfg = load_config(None, ["train.steps=5"])
    again = load_config(OmegaConf.create(to_yaml(cfg)))
    assert again == cfg
    assert config_hash(cfg) == config_hash(load_config(None, ["train.steps=9", "run.name=other"]))
    assert config_hash(cfg) != config_hash(load_config(None, ["train.lr=0.5"]))


def test_config_hash_and_the_resume_check_agree_on_every_key():
    """One list decides both: a key changes the hash exactly when a resume refuses to change it."""
    from distrain.checkpoint.compat import differing_keys
    from distrain.config import flatten, to_container

    base = to_container(load_config(None))
    leaves = list(flatten(base))
    assert len(leaves) > 40  # every key of the schema, not a handful
    for key in leaves + ["model.kwargs.hidden", "strategy.kwargs.stage", "data.kwargs.block_size"]:
        changed = OmegaConf.to_container(OmegaConf.create(base))
        node = changed
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = "<changed>"
        refused = bool(differing_keys(base, changed))
        rehashed = config_hash(OmegaConf.create(base)) != config_hash(OmegaConf.create(changed))
        assert refused == rehashed, f"{key}: resume refuses it: {refused}, the config hash changes: {rehashed}"


def test_surprising_settings_each_get_one_line():
    from distrain.config import surprises

    assert surprises(load_config(None), has_eval_data=True) == []
    lines = surprises(load_config(None, ["train.warmup_steps=200", "train.steps=100", "train.lr=0.01",
                                         "train.eval_every=10"]), has_eval_data=False)
    assert lines == ["train.warmup_steps=200 is more than train.steps=100: the learning rate never reaches "
                     "train.lr=0.01 (it ends at 0.005)",
                     "train.eval_every=10, but there is no eval data (data.eval_fraction=0, or no eval_data passed "
                     "to Trainer): nothing will be evaluated"]
