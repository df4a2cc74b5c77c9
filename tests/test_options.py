"""Typed builder options (distrain/config/options.py): every strategy, model and dataset builder's keyword signature
is its schema; unknown keys and wrong types are one ConfigError naming the key, the type and what is allowed."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Union

import pytest

from conftest import run_cli_here
from distrain.config.options import options_schema, parse_options
from distrain.errors import ConfigError


def _builder(spec, hidden: int = 128, rate: float = 0.5, names: Sequence[str] = ("a",), hook: Optional[str] = None,
             either: Union[str, List[str]] = "auto", flag: bool = False):
    return hidden


def test_schema_is_a_dataclass_of_the_signature_with_checkable_types():
    schema = options_schema(_builder, ("spec",))
    assert dataclasses.is_dataclass(schema) and schema.__name__ == "_builderOptions"
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert list(fields) == ["hidden", "rate", "names", "hook", "either", "flag"]
    assert fields["hidden"].type is int and fields["hook"].type == Optional[str]
    assert fields["names"].type == List[str]


def test_values_are_converted_completed_and_checked():
    got = parse_options(_builder, {"rate": 1, "flag": "true"}, "model.kwargs", "model 'x'", ("spec",))
    assert got == {"hidden": 128, "rate": 1.0, "names": ["a"], "hook": None, "either": "auto", "flag": True}
    assert isinstance(got["rate"], float)
    with pytest.raises(ConfigError) as err:
        parse_options(_builder, {"hidden": 2.5}, "model.kwargs", "model 'x'", ("spec",))
    assert err.value.key == "model.kwargs.hidden"
    assert "not a valid int" in str(err.value) and "hidden (int, default 128)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_options(_builder, {"hiden": 3}, "model.kwargs", "model 'x'", ("spec",))
    assert err.value.key == "model.kwargs.hiden" and "not accepted by model 'x'" in str(err.value)


@pytest.mark.parametrize("override, key, words", [
    ("strategy.kwargs.bucket_cap_mb=lots", "strategy.kwargs.bucket_cap_mb", "not a valid float"),
    ("strategy.kwargs.buckets=3", "strategy.kwargs.buckets", "bucket_cap_mb (float, default 25.0)"),
    ("model.kwargs.hidden=2.5", "model.kwargs.hidden", "not a valid int for model 'cnn'"),
    ("data.kwargs.split_seed=x", "data.kwargs.split_seed", "not a valid int for dataset 'digits'"),
])
def test_cli_reports_a_bad_builder_option_in_one_paragraph(override, key, words, capsys, tmp_path):
    code, _, err = run_cli_here(["train", "configs/quickstart.yaml", override, f"run.dir={tmp_path}",
                                 "dist.device=cpu"], capsys)
    assert code == 2, err
    paragraph = " ".join(err.split())  # the CLI wraps its paragraph at 100 columns
    assert key in paragraph and words in paragraph and "Traceback" not in err
