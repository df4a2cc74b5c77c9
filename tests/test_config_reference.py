"""docs/config-reference.md is generated from the schema; it fails here the moment the two drift apart."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from distrain.config import Config
from distrain.tools.config_reference import OUTPUT, main, render, sections


def _schema_keys(node: DictConfig, prefix: str = "") -> list:
    keys = []
    for key in node.keys():
        child = node._get_node(key)
        dotted = f"{prefix}{key}"
        # A section or a nested settings dataclass (metrics.mlflow); kwargs dicts are leaves.
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            keys += _schema_keys(child, dotted + ".")
        else:
            keys.append(dotted)
    return keys


def test_docs_config_reference_is_up_to_date():
    assert OUTPUT.read_text() == render(), "docs/config-reference.md is stale: run `python -m distrain.tools.config_reference`"


def test_every_schema_key_is_documented_with_type_default_and_meaning():
    rows = {row["key"]: row for section in sections() for row in section["keys"]}
    schema = _schema_keys(OmegaConf.structured(Config))
    assert sorted(rows) == sorted(schema)
    undocumented = [key for key, row in rows.items() if not row["description"]]
    assert not undocumented, f"add a comment next to these fields in distrain/config/schema.py: {undocumented}"
    assert rows["train.global_batch"]["default"] == "64" and rows["train.micro_batch"]["default"] == "null"
    assert rows["train.betas"]["type"] == "List[float]"
    assert "sgd, adam, adamw" in rows["train.optimizer"]["description"] or "sgd | adam" in rows["train.optimizer"]["description"]


def test_check_mode_reports_drift(tmp_path, capsys):
    out = tmp_path / "ref.md"
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("| `train.steps` | `int` | `100` |", "| `train.steps` | `int` | `99` |"))
    assert main(["--check", "--out", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
