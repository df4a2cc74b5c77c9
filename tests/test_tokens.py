"""Token shards: `distrain data prepare` (byte-level and a tokenizers file), windows by global index across shards,
and every check at open (missing shard, wrong dtype or size, index mismatch, ids outside the vocabulary)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli_here
from data_fixtures import token_shards
from distrain.data import build_datasets
from distrain.data.prepare import prepare
from distrain.data.shard_writer import ShardWriter
from distrain.data.tokens import TokenIndex, TokenWindows
from distrain.errors import ConfigError, DataError, UsageError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return token_shards(tmp_path_factory.mktemp("tokens") / "stdlib", max_bytes=200_000, shard_tokens=50_000)


def test_prepare_writes_shards_an_index_and_the_stdlib_bytes(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["tokenizer"]["eot"] == 256
    train = np.concatenate([np.fromfile(shards / s["file"], dtype=np.uint16) for s in index["splits"]["train"]])
    evaluation = np.fromfile(shards / index["splits"]["eval"][0]["file"], dtype=np.uint16)
    assert [s["tokens"] for s in index["splits"]["train"]][:-1] == [50_000] * (len(index["splits"]["train"]) - 1)
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0].read_bytes()
    assert bytes(train[:len(first)].astype(np.uint8)) == first and train[len(first)] == 256  # the end of document
    ends = int(np.sum(train == 256)) + int(np.sum(evaluation == 256))  # one per document; no byte is 256
    assert len(train) + len(evaluation) - ends == 200_000  # --max-bytes
    assert 0.005 < len(evaluation) / (len(train) + len(evaluation)) < 0.02


def test_windows_by_global_index_cross_shard_boundaries(shards):
    train, evaluation = build_datasets("tokens", {"path": str(shards), "block_size": 100}, 0.2)
    index = TokenIndex.read(shards)
    stream = np.concatenate([np.fromfile(s.path, dtype=np.uint16) for s in index.splits["train"]]).astype(np.int64)
    assert len(train) == (len(stream) - 1) // 100 and train.spec.num_classes == 257 and len(evaluation) > 0
    crossing = 50_000 // 100 - 1  # window 499 spans the first two shards
    for i in (0, crossing, len(train) - 1):
        x, y = train[i]
        assert torch.equal(x, torch.from_numpy(stream[i * 100:i * 100 + 100]))
        assert torch.equal(y, torch.from_numpy(stream[i * 100 + 1:i * 100 + 101]))
    xb, yb = train.__getitems__([crossing, 0])
    assert xb.shape == (2, 100) and torch.equal(xb[0], train[crossing][0]) and torch.equal(yb[1], train[0][1])
    limited, _ = build_datasets("tokens", {"path": str(shards), "block_size": 100, "eval_windows": 3}, 0.2)
    assert len(_) == 3


def test_without_an_eval_split_the_tail_windows_are_held_out(tmp_path):
    writer = ShardWriter(tmp_path / "s", vocab_size=50, tokenizer={"kind": "test"})
    writer.add("train", np.arange(1001) % 50)
    writer.close()
    train, evaluation = build_datasets("tokens", {"path": str(tmp_path / "s"), "block_size": 10}, 0.2)
    assert (len(train), len(evaluation)) == (80, 20)
    assert torch.equal(evaluation[0][0], torch.arange(800, 810) % 50)


def test_prepare_with_a_tokenizers_file_built_here(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"],
                                                        show_progress=False))
    tok.save(str(tmp_path / "tok.json"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("".join(corpus[:40]))
    (src / "b.py").write_text("".join(corpus[40:]))
    (src / "blob.bin").write_bytes(b"\0\1\2" * 100)
    summary = prepare([str(src)], tmp_path / "out", tokenizer=str(tmp_path / "tok.json"), eval_fraction=0.1)
    assert summary.eot == tok.token_to_id("</s>") and summary.skipped == [src / "blob.bin"]
    assert summary.documents == 2 and summary.tokens["train"] > 0 and summary.tokens["eval"] > 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    train, _ = build_datasets("tokens", {"path": str(tmp_path / "out"), "block_size": 8}, 0.2)
    ids = np.concatenate([np.fromfile(s.path, dtype=np.uint16) for s in TokenIndex.read(tmp_path / "out").splits["train"]])
    text = tok.decode([int(i) for i in ids if i != summary.eot])
    assert "return x + 1" in text and train.spec.num_classes == tok.get_vocab_size()


def test_data_prepare_command_prints_a_summary_and_never_overwrites(tmp_path, capsys):
    def cli(*args):
        code, out, err = run_cli_here(["data", "prepare", *args], capsys)
        return code, out, " ".join(err.split())  # the paragraph is wrapped for the terminal

    code, out, _ = cli("stdlib", "--out", tmp_path / "d", "--max-bytes", "30000", "--shard-tokens", "10000")
    assert code == 0 and "tokens (train" in out and "in 4 shard(s) of uint16" in out and "vocab 257 (byte-level" in out
    code, _, err = cli("stdlib", "--out", tmp_path / "d")
    assert code == 2 and "already holds token shards" in err and "nothing is overwritten" in err
    code, _, err = cli(tmp_path / "nowhere", "--out", tmp_path / "e")
    assert code == 2 and "is neither a file nor a directory" in err
    code, _, err = cli("stdlib", "--out", tmp_path / "f", "--tokenizer", tmp_path / "d" / "index.json")
    assert code == 2 and "is not a Hugging Face tokenizers file" in err


def _copy(shards: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in shards.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _edit_index(root: Path, edit) -> None:
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))


def test_bad_shards_are_one_paragraph_naming_the_file(shards, tmp_path):
    def check(name: str, damage, *fragments: str) -> None:
        root = _copy(shards, tmp_path / name)
        damage(root)
        with pytest.raises(DataError) as err:
            build_datasets("tokens", {"path": str(root), "block_size": 16}, 0.2)
        message = str(err.value)
        assert "\n" not in message and all(f in message for f in fragments), message

    check("missing", lambda r: (r / "train-000001.bin").unlink(), "train-000001.bin is missing", "Restore the file")
    check("dtype", lambda r: _edit_index(r, lambda i: i.update(dtype="uint32")),
          "train-000000.bin has 100,000 bytes", "the size of 50,000 uint16 tokens: the shard's dtype is not the index's")
    check("truncated", lambda r: (r / "train-000002.bin").write_bytes((r / "train-000002.bin").read_bytes()[:-10]),
          "train-000002.bin has", "the index does not match the file")
    check("index", lambda r: _edit_index(r, lambda i: i["splits"]["train"][0].update(tokens=49_000)),
          "train-000000.bin", "says 49,000 uint16 tokens", "the index does not match the file")
    check("vocab-index", lambda r: _edit_index(r, lambda i: i.update(vocab_size=200)),
          "holds token id 256 by", "outside the vocabulary (vocab_size 200")

    def corrupt_first_token(root: Path) -> None:
        data = bytearray((root / "train-000000.bin").read_bytes())
        data[0:2] = np.array([40000], dtype=np.uint16).tobytes()
        (root / "train-000000.bin").write_bytes(bytes(data))
        _edit_index(root, lambda i: i["splits"]["train"][0].update(max_token=None))

    check("vocab-data", corrupt_first_token, "train-000000.bin holds token id 40000 at position 0",
          "prepare it again")
    check("no-index", lambda r: (r / "index.json").unlink(), "has no index.json", "holds .bin files but no index")


def test_an_id_outside_the_vocab_mid_shard_fails_the_read_naming_the_position(shards, tmp_path, monkeypatch):
    monkeypatch.setattr("distrain.data.tokens.SPOT_CHECK_TOKENS", 1000)  # as in a shard far larger than 65,536
    root = _copy(shards, tmp_path / "mid")
    data = np.fromfile(root / "train-000001.bin", dtype=np.uint16).copy()
    data[40_000] = 999  # past the spot checks at both ends and the checksummed head; the index's max_token is stale
    data.tofile(root / "train-000001.bin")
    train, _ = build_datasets("tokens", {"path": str(root), "block_size": 100}, 0.2)
    with pytest.raises(DataError, match="train-000001.bin holds token id 999 at position 40,000"):
        train[(50_000 + 40_000) // 100]


def test_tokens_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.kwargs.path"):
        build_datasets("tokens", {}, 0.2)
    with pytest.raises(ConfigError, match="data.kwargs.block_size"):
        build_datasets("tokens", {"path": str(tmp_path), "block_size": 0}, 0.2)
    with pytest.raises(UsageError, match="already holds token shards"):
        writer = ShardWriter(tmp_path / "w", 10, {})
        writer.close()
        ShardWriter(tmp_path / "w", 10, {})


def test_windows_unpickle_without_their_maps(shards):
    import pickle

    train, _ = build_datasets("tokens", {"path": str(shards), "block_size": 32}, 0.2)
    train[0]
    again = pickle.loads(pickle.dumps(train))
    assert again._maps is None and torch.equal(again[5][0], train[5][0])
    assert isinstance(train, TokenWindows)


def test_an_empty_shard_in_the_middle_is_skipped(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    np.arange(0, 30, dtype=np.uint16).tofile(root / "a.bin")
    (root / "b.bin").write_bytes(b"")
    np.arange(30, 50, dtype=np.uint16).tofile(root / "c.bin")
    (root / "index.json").write_text(json.dumps({"format": "distrain-tokens", "version": 1, "dtype": "uint16",
                                                 "vocab_size": 64, "splits": {"train": [
                                                     {"file": "a.bin", "tokens": 30}, {"file": "b.bin", "tokens": 0},
                                                     {"file": "c.bin", "tokens": 20}]}}))
    train, _ = build_datasets("tokens", {"path": str(root), "block_size": 7}, 0.0)
    assert len(train) == 7 and torch.equal(train[4][0], torch.arange(28, 35))  # across a.bin, b.bin, c.bin


def test_prepare_shows_a_progress_bar_when_asked(tmp_path, capsys):
    summary = prepare(["stdlib"], tmp_path / "p", max_bytes=20_000, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "100%" in err and "20.0k/20.0k" in err
    assert summary.bytes_read == 20_000 and "tokens (train" in summary.describe()
