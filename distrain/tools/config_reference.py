"""The config reference, generated from the schema in distrain/config/schema.py: every key, its type, default and comment.

    python -m distrain.tools.config_reference          # (re)write docs/config-reference.md
    python -m distrain.tools.config_reference --check  # exit 1 when docs/config-reference.md is out of date

Types and defaults come from the dataclasses themselves; the descriptions are the comments next to (or right
above) each field in the source, so the schema stays the single place where a knob is documented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import sys
import tokenize
from pathlib import Path
from typing import Any, Dict, List, Optional

from distrain.config import schema as config_module
from distrain.config.options import describe_options
from distrain.data.datasets import DATASETS
from distrain.models import MODELS
from distrain.strategies import STRATEGIES, strategy_class

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "docs" / "config-reference.md"


def _field_comments(source: str) -> Dict[str, Dict[str, str]]:
    """{class name: {field name: comment}} from the trailing comment of each field line, or the comment lines
    directly above it."""
    comments_by_line: Dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments_by_line[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    out: Dict[str, Dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: Dict[str, str] = {}
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            parts = []
            line = item.lineno - 1  # comment lines right above the field (a multi-line explanation)
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                parts.insert(0, comments_by_line.get(line, ""))
                line -= 1
            trailing = [comments_by_line[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments_by_line]
            fields[item.target.id] = " ".join(p for p in parts + trailing if p)
        out[node.name] = fields
    return out


def _type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, prefix: str, comments: Dict[str, Dict[str, str]]) -> List[Dict[str, str]]:
    """One row per key of a section's dataclass; a nested settings dataclass (metrics.mlflow) gives its own keys."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            rows += _rows(nested, key, comments)
            continue
        description = comments.get(cls.__name__, {}).get(f.name, "")
        choices = config_module.CHOICES.get(key)
        if choices and not all(c in description for c in choices):
            description = (description + "; " if description else "") + f"one of: {', '.join(choices)}"
        rows.append({"key": key, "type": _type_name(f.type), "default": _yaml_value(_default(f)),
                     "description": description})
    return rows


def sections() -> List[Dict[str, Any]]:
    """[{section, doc, keys: [{key, type, default, description}]}] in the order of the Config dataclass."""
    source = Path(config_module.__file__).read_text()
    comments = _field_comments(source)
    out = []
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory  # type: ignore[misc]
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        rows = _rows(cls, section.name, comments)
        out.append({"section": section.name, "doc": (cls.__doc__ or "").strip()
                    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else "", "keys": rows})
    return out


def registered_builders() -> List[Dict[str, Any]]:
    """[{section, what, builders: [(name, builder, skip)]}] for strategy.kwargs, model.kwargs and data.kwargs: every
    registered builder whose signature is the typed options of its section (see distrain/config/options.py), with
    the parameters that are not options."""
    return [{"section": "strategy.kwargs", "what": "strategy.name",
             "builders": [(name, strategy_class(name).__init__, ("self", "ctx")) for name in STRATEGIES]},
            {"section": "model.kwargs", "what": "model.name",
             "builders": [(name, MODELS[name], ("spec",)) for name in sorted(MODELS)]},
            {"section": "data.kwargs", "what": "data.name",
             "builders": [(name, DATASETS[name], ("eval_fraction",)) for name in DATASETS]}]


def builder_options() -> List[Dict[str, Any]]:
    """[{section, what, rows: [(name, [option descriptions])]}]: what each registered builder accepts."""
    return [{"section": part["section"], "what": part["what"],
             "rows": [(name, describe_options(builder, skip)) for name, builder, skip in part["builders"]]}
            for part in registered_builders()]


def render() -> str:
    """The markdown text of docs/config-reference.md."""
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from distrain/config/schema.py by `python -m distrain.tools.config_reference`; do not edit by hand. "
        "tests/test_config_reference.py fails when this file and the schema drift apart. -->",
        "",
        "Every key of a distrain config, with its type, default and meaning. Set them in the YAML file",
        "(`train: {steps: 50}`) or on the command line as overrides (`train.steps=50`). Unknown keys, wrong types",
        "and out-of-range values are refused with a message naming the key. `distrain config show CONFIG` prints",
        "the resolved config and the derived batch plan.",
        "",
    ]
    for section in sections():
        lines += [f"## `{section['section']}`", ""]
        if section["doc"]:
            lines += [" ".join(section["doc"].split()), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in section["keys"]:
            lines.append(f"| `{row['key']}` | `{_cell(row['type'])}` | `{_cell(row['default'])}` | "
                         f"{_cell(row['description'])} |")
        lines.append("")
    lines += ["## Builder options", "",
              "What each built-in strategy, model and dataset accepts in its `kwargs` (types and ranges are checked; a "
              "key not listed is refused).", ""]
    for part in builder_options():
        lines += [f"### `{part['section']}`", "", f"| `{part['what']}` | options |", "| --- | --- |"]
        for name, options in part["rows"]:
            lines.append(f"| `{name}` | {_cell('; '.join(options)) or 'none'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrain.tools.config_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date instead of writing")
    parser.add_argument("--out", default=str(OUTPUT), help=f"output file (default {OUTPUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is out of date: run `python -m distrain.tools.config_reference`", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
