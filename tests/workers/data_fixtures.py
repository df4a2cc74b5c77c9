"""Data made locally for the data-loading tests: token shards of the stdlib, digits as PNG files, a Hugging Face
dataset on disk, and one small YAML config per kind (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

AUGMENT = "{rotate: 12, translate: 0.1, scale: 0.1, flip: true, brightness: 0.1, contrast: 0.2}"


def render_digits(out: Path, size: int = 16, limit: int = 0) -> Path:
    """The digits as PNG files under ``out`` (what examples/images/render_digits.py writes)."""
    from distrain.data.datasets import render_digits as render

    render(out, size=size, limit=limit)
    return out


def token_shards(out: Path, max_bytes: int = 300_000, shard_tokens: int = 100_000) -> Path:
    from distrain.data.prepare import prepare

    prepare(["stdlib"], out, max_bytes=max_bytes, shard_tokens=shard_tokens, progress=False)
    return out


def hf_digits(out: Path) -> Path:
    import datasets

    from distrain.data import build_datasets

    train, _ = build_datasets("digits", {}, 0.2)
    features = datasets.Features({"pixels": datasets.Array3D((1, 8, 8), "float32"),
                                  "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({"pixels": train.inputs.numpy(), "label": train.targets.numpy()},
                               features=features).save_to_disk(str(out))
    return out


def configs(root: Path) -> Dict[str, Path]:
    """{kind: YAML config} for builtin (digits), tokens, images and hf data, each made under ``root``."""
    tokens = token_shards(root / "tokens")
    images = render_digits(root / "png", size=16, limit=150)
    hf = hf_digits(root / "hf")
    texts = {
        "builtin": "model: {name: mlp}\ndata: {name: digits}\n",
        "tokens": (f"model: {{name: gpt, kwargs: {{embed: 32, heads: 2, layers: 1}}}}\n"
                   f"data: {{name: tokens, kwargs: {{path: {tokens}, block_size: 32, eval_windows: 64}}}}\n"),
        "images": (f"model: {{name: cnn, kwargs: {{channels: 8, hidden: 32}}}}\n"
                   f"data: {{name: images, kwargs: {{path: {images}, size: 16, channels: 1, augment: {AUGMENT}}}}}\n"),
        "hf": f"model: {{name: mlp}}\ndata: {{name: hf, kwargs: {{path: {hf}, input: pixels, target: label}}}}\n",
    }
    out = {}
    for kind, text in texts.items():
        out[kind] = root / f"{kind}.yaml"
        out[kind].write_text(f"run: {{name: {kind}}}\n{text}strategy: {{name: ddp}}\n")
    return out
