"""Bad data inputs end to end through the CLI: one paragraph naming the thing, exit 2 for the user's data or
config, exit 1 when a dataset's own code fails, never a traceback, never a hang. (The shard checks one by one, in
one process: tests/test_tokens.py; inconsistent keys and a raising dataset with and without workers:
tests/test_data_loading.py.)"""

from __future__ import annotations

import json
from pathlib import Path


from conftest import run_cli
from data_fixtures import render_digits, token_shards


def _paragraph(stderr: str) -> str:
    return " ".join(stderr.split())


GPT = "{name: gpt, kwargs: {embed: 16, heads: 2, layers: 1}}"


def _config(path: Path, data: str, model: str = GPT) -> Path:
    path.write_text(f"run: {{name: bad, dir: {path.parent / 'runs'}}}\nmodel: {model}\ndata: {data}\n"
                    f"train: {{global_batch: 8, micro_batch: 4, steps: 4}}\nmetrics: {{progress: none}}\n")
    return path


def test_negative_num_workers_and_an_unimportable_collate_fn(tmp_path):
    config = _config(tmp_path / "c.yaml", "{name: text, kwargs: {max_chars: 5000, block_size: 16}}")
    proc = run_cli(["train", str(config), "data.num_workers=-1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'data.num_workers' has value -1" in _paragraph(proc.stderr)
    proc = run_cli(["launch", "--nproc-per-node", "2", str(config), "data.collate_fn=no_such_pkg.collate:pad"])
    message = _paragraph(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.collate_fn='no_such_pkg.collate:pad' does not import: ModuleNotFoundError" in message


def test_a_bad_shard_is_one_paragraph_naming_the_file(tmp_path):
    shards = token_shards(tmp_path / "shards", max_bytes=20_000, shard_tokens=5_000)
    index = json.loads((shards / "index.json").read_text())
    index["dtype"] = "uint32"
    (shards / "index.json").write_text(json.dumps(index))
    config = _config(tmp_path / "c.yaml", f"{{name: tokens, kwargs: {{path: {shards}, block_size: 16}}}}")
    proc = run_cli(["train", str(config)])
    message = _paragraph(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message.count("distrain: error:") == 1
    assert f"Token shard {shards / 'train-000000.bin'} has 10,000 bytes" in message and "dtype" in message


def test_a_dataset_that_raises_in_a_worker_stops_every_rank_naming_the_sample(tmp_path):
    images = render_digits(tmp_path / "png", size=16, limit=40)
    broken = sorted((images / "train").rglob("*.png"))[7]
    broken.write_text("not a png")
    config = _config(tmp_path / "c.yaml", f"{{name: images, kwargs: {{path: {images}, size: 16, channels: 1}}, "
                                          f"num_workers: 2}}", "{name: cnn, kwargs: {channels: 4, hidden: 8}}")
    proc = run_cli(["launch", "--nproc-per-node", "2", str(config), "train.steps=20"], timeout=240)
    message = _paragraph(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"cannot identify image file '{broken}'" in message and "in DataLoader worker" in message
    assert "Loading sample " in message and "of the training data (ImageFolder) for step " in message
