"""`distrain data prepare` never writes into an existing directory, publishes its shards in one rename, and
`distrain data verify` / every open check them against their checksums: real `distrain` processes, run at once,
killed with SIGKILL, and shards damaged by hand. (The shard format and its one-paragraph errors:
tests/test_tokens.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, child_env, run_cli, run_cli_here
from data_fixtures import token_shards
from distrain.data import build_datasets
from distrain.data.shard_writer import ShardWriter
from distrain.data.staging import PARTIAL
from distrain.data.tokens import TokenIndex
from distrain.errors import DataError, UsageError


def _paragraph(text: str) -> str:
    return " ".join(text.split())


def _corpus(path: Path, megabytes: int, salt: str) -> Path:
    """A text file of about ``megabytes`` MiB: the stdlib's source, prefixed per line with ``salt`` so two corpora
    differ everywhere."""
    base = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40])
    lines = [salt.encode() + line for line in base.splitlines(keepends=True)]
    block = b"".join(lines)
    with open(path, "wb") as f:
        for _ in range(megabytes * 2**20 // len(block) + 1):
            f.write(block)
    return path


def _prepare(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distrain", "data", "prepare", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def _train_tokens(root: Path) -> np.ndarray:
    return np.concatenate([np.fromfile(s.path, dtype=np.uint16) for s in TokenIndex.read(root).splits["train"]])


def test_an_out_that_exists_and_is_not_empty_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, _, err = run_cli_here(["data", "prepare", "stdlib", "--out", out, "--max-bytes", "5000"], capsys)
    message = _paragraph(err)
    assert code == 2 and message.count("distrain: error:") == 1
    assert f"--out {out} is a directory that is not empty (1 entries, e.g. notes.txt)" in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli_here(["data", "prepare", "stdlib", "--out", tmp_path / "file"], capsys)
    assert code == 2 and "exists and is not a directory" in _paragraph(err)
    empty = tmp_path / "empty"
    empty.mkdir()  # `mkdir -p DIR && distrain data prepare ... --out DIR`: nothing in it to lose
    code, out_text, _ = run_cli_here(["data", "prepare", "stdlib", "--out", empty, "--max-bytes", "5000"], capsys)
    assert code == 0 and (empty / "index.json").is_file()
    assert not list(tmp_path.glob(f".*{PARTIAL}*"))


def test_two_prepares_into_one_out_at_once_one_is_refused_and_the_result_verifies(tmp_path):
    corpora = [_corpus(tmp_path / f"{name}.txt", 16, name) for name in ("alpha", "beta")]
    out = tmp_path / "shards"
    procs = [_prepare(c, "--out", out, "--shard-tokens", 2_000_000, "--eval-fraction", 0) for c in corpora]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = _paragraph(next(err for code, _, err in results if code == 2))
    assert "Traceback" not in refused and refused.count("distrain: error:") == 1
    assert ("is writing" in refused and "only one may" in refused) or "appeared while this prepare ran" in refused \
        or "already holds token shards" in refused, refused
    winner = corpora[[code for code, _, _ in results].index(0)]
    assert not list(tmp_path.glob(f".*{PARTIAL}*"))  # the refused one left nothing behind
    proc = run_cli(["data", "verify", str(out)])
    assert proc.returncode == 0 and "every sha256 matches" in proc.stdout, proc.stderr
    ids = _train_tokens(out)
    assert ids[-1] == 256 and ids[:-1].astype(np.uint8).tobytes() == winner.read_bytes()  # one corpus, whole


def test_a_prepare_killed_half_way_leaves_nothing_training_accepts_and_a_rerun_succeeds(tmp_path):
    corpus = _corpus(tmp_path / "big.txt", 48, "k")
    out = tmp_path / "shards"
    proc = _prepare(corpus, "--out", out, "--shard-tokens", 1_000_000)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(f".shards{PARTIAL}*/train-000002.bin")):  # a few shards written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and not list(tmp_path.glob("*.bin"))
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{name: r, dir: {tmp_path / 'runs'}}}\nmodel: {{name: gpt, kwargs: {{embed: 16, heads: "
                      f"2, layers: 1}}}}\ndata: {{name: tokens, kwargs: {{path: {out}, block_size: 16}}}}\n"
                      f"train: {{global_batch: 8, steps: 2}}\nmetrics: {{progress: none}}\n")
    trained = run_cli(["train", str(config)])
    message = _paragraph(trained.stderr)
    assert trained.returncode == 2 and "Traceback" not in trained.stderr and message.count("distrain: error:") == 1
    assert f"Token shards: {out} does not exist" in message and "did not finish" in message, message
    rerun = run_cli(["data", "prepare", str(corpus), "--out", str(out), "--max-bytes", "200000"])
    assert rerun.returncode == 0, rerun.stderr
    assert "removed" in rerun.stderr and "was killed" in _paragraph(rerun.stderr)
    assert not list(tmp_path.glob(f".*{PARTIAL}*")) and run_cli(["data", "verify", str(out)]).returncode == 0


def test_a_shard_damaged_by_hand_is_refused_at_open_or_by_verify(tmp_path, capsys):
    def copy(name: str) -> Path:
        return token_shards(tmp_path / name, max_bytes=300_000, shard_tokens=100_000)

    def verify(root: Path) -> tuple:
        code, out, err = run_cli_here(["data", "verify", root], capsys)
        return code, _paragraph(err)

    truncated = copy("truncated")
    shard = truncated / "train-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(DataError, match="train-000001.bin has 199,000 bytes"):
        build_datasets("tokens", {"path": str(truncated), "block_size": 16}, 0.2)
    code, message = verify(truncated)
    assert code == 1 and "train-000001.bin has 199,000 bytes" in message

    flipped = copy("flipped")  # mid-shard, past the checked head, with ids still inside the vocabulary
    data = np.fromfile(flipped / "train-000001.bin", dtype=np.uint16)
    data[40_000:40_008] = (data[40_000:40_008] + 1) % 256  # bytes 80,000.. of the shard
    data.tofile(flipped / "train-000001.bin")
    build_datasets("tokens", {"path": str(flipped), "block_size": 16}, 0.2)  # the cheap checks cannot see it
    code, message = verify(flipped)
    assert code == 1 and message.count("distrain: error:") == 1
    assert f"Token shard {flipped / 'train-000001.bin'} fails its sha256 checksum" in message
    data[100] = (data[100] + 1) % 256  # in the head: every open sees it
    data.tofile(flipped / "train-000001.bin")
    with pytest.raises(DataError, match="train-000001.bin does not match its checksum"):
        build_datasets("tokens", {"path": str(flipped), "block_size": 16}, 0.2)
    code, message = verify(copy("good"))
    assert code == 0


def test_shards_of_an_older_prepare_without_checksums_still_open_and_verify_says_so(tmp_path, capsys):
    root = token_shards(tmp_path / "old", max_bytes=30_000, shard_tokens=10_000)
    index = json.loads((root / "index.json").read_text())
    index["version"] = 1
    for entries in index["splits"].values():
        for entry in entries:
            del entry["sha256"], entry["head_sha256"]
    (root / "index.json").write_text(json.dumps(index))
    train, _ = build_datasets("tokens", {"path": str(root), "block_size": 16}, 0.2)
    assert len(train) > 0 and not train.index.checksummed
    code, out, _ = run_cli_here(["data", "verify", root], capsys)
    assert code == 0 and "records no checksums" in _paragraph(out)


def test_an_out_that_appears_while_writing_is_never_overwritten(tmp_path):
    out = tmp_path / "s"
    first = ShardWriter(out, 10, {})
    first.add("train", np.arange(10))
    with pytest.raises(UsageError, match="is writing .* right now"):  # the first one holds its lock
        ShardWriter(out, 10, {})
    out.mkdir()
    (out / "theirs.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="appeared while this prepare ran"):
        first.close()
    assert [p.name for p in out.iterdir()] == ["theirs.bin"] and not list(tmp_path.glob(f".*{PARTIAL}*"))
