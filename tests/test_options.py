"""Typed builder options (distrain/config/options.py): every strategy, model and dataset builder's keyword signature
is its schema; unknown keys, wrong types and values out of the declared range are one ConfigError naming the key, the
value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, List, Optional, Sequence, Union

import pytest

from conftest import run_cli_here
from distrain.config.options import Range, numeric_options, option_ranges, options_schema, parse_options
from distrain.tools.config_reference import registered_builders
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
    ("strategy.kwargs.buckets=3", "strategy.kwargs.buckets", "bucket_cap_mb (float, > 0, default 25.0)"),
    ("strategy.kwargs.bucket_cap_mb=-5", "strategy.kwargs.bucket_cap_mb", "-5.0, which is out of range for strategy "
                                                                         "'ddp': it must be a number > 0"),
    ("model.kwargs.channels=0", "model.kwargs.channels", "0, which is out of range for model 'cnn': it must be an "
                                                         "integer >= 1"),
    ("data.kwargs.split_seed=-1", "data.kwargs.split_seed", "-1, which is out of range for dataset 'digits': it must "
                                                            "be an integer in [0, 2**32)"),
    ("model.kwargs.hidden=2.5", "model.kwargs.hidden", "not a valid int for model 'cnn'"),
    ("data.kwargs.split_seed=x", "data.kwargs.split_seed", "not a valid int for dataset 'digits'"),
])
def test_cli_reports_a_bad_builder_option_in_one_paragraph(override, key, words, capsys, tmp_path):
    code, _, err = run_cli_here(["train", "configs/quickstart.yaml", override, f"run.dir={tmp_path}",
                                 "dist.device=cpu"], capsys)
    assert code == 2, err
    paragraph = " ".join(err.split())  # the CLI wraps its paragraph at 100 columns
    assert key in paragraph and words in paragraph and "Traceback" not in err


def _ranged(spec, width: Annotated[int, Range(ge=1)] = 8, share: Annotated[float, Range(ge=0, lt=1)] = 0.5,
            stage: Annotated[int, Range(one_of=(0, 2), note="the stage")] = 0,
            limit: Annotated[Optional[int], Range(gt=0)] = None, sizes: Annotated[List[int], Range(ge=1)] = (1,)):
    return width


@pytest.mark.parametrize("values, key, words", [
    ({"width": 0}, "model.kwargs.width", "has value 0, which is out of range for model 'x': it must be an integer >= 1."),
    ({"share": 1.0}, "model.kwargs.share", "it must be a number in [0, 1)."),
    ({"share": math.nan}, "model.kwargs.share", "it must be a number in [0, 1)."),
    ({"stage": 1}, "model.kwargs.stage", "it must be one of 0, 2 (the stage)."),
    ({"limit": 0}, "model.kwargs.limit", "it must be an integer > 0."),
    ({"sizes": [2, 0]}, "model.kwargs.sizes", "each entry must be an integer >= 1."),
])
def test_values_out_of_the_declared_range_are_refused(values, key, words):
    with pytest.raises(ConfigError) as err:
        parse_options(_ranged, values, "model.kwargs", "model 'x'", ("spec",))
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_values_in_range_and_nulls_pass():
    got = parse_options(_ranged, {"width": 1, "share": 0.0, "stage": 2, "limit": None, "sizes": [1, 5]},
                        "model.kwargs", "model 'x'", ("spec",))
    assert got == {"width": 1, "share": 0.0, "stage": 2, "limit": None, "sizes": [1, 5]}


def test_a_numeric_option_without_a_range_is_found():
    assert numeric_options(_builder, ("spec",)) == ["hidden", "rate"]  # the check below would fail for _builder
    assert set(numeric_options(_ranged, ("spec",))) == set(option_ranges(_ranged, ("spec",)))


def test_every_numeric_option_of_every_registered_builder_declares_a_range():
    """A new strategy, model or dataset with an int or float option must declare its range in its signature
    (``Annotated[int, Range(ge=1)]``, see distrain/config/options.py), or this fails."""
    missing, checked = [], 0
    for part in registered_builders():
        for name, builder, skip in part["builders"]:
            numeric = numeric_options(builder, skip)
            checked += len(numeric)
            missing += [f"{part['section']}.{option} ({part['what']}={name})" for option in numeric
                        if option not in option_ranges(builder, skip)]
    assert checked >= 30 and not missing, f"numeric options without a declared Range: {missing}"
