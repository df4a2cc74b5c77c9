"""Checkpoint hashing is shared out, and decisions are taken by all ranks alike (one 2-rank launch).

Rank 0 used to hash every rank's shards at a commit, and again at a resume, while the other ranks waited in a
collective: a checkpoint big enough to hash for longer than dist.timeout_s timed the peers out. Now every rank hashes
the files it wrote (at a save, right after writing them; at a resume, its share), and rank 0 only the files it wrote.
The same launch checks that a step whose loss is nan on one rank is skipped on every rank (train.on_nonfinite), and
that a run directory locked by a live process refuses every rank, leaving none waiting in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import time

from conftest import run_torchrun
from distrain.checkpoint.manifest import own_digests

RANK0 = ["dcp/.metadata", "dcp/__0_0.distcp", "rng/rank0.json", "trainer_state.json"]
RANK1 = ["dcp/__1_0.distcp", "rng/rank1.json"]


def test_each_rank_hashes_its_own_files_and_all_ranks_agree(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": time.time(), "token": "pytest"}))
    proc = run_torchrun(2, ["tests/workers/checkpoint_hash_worker.py", str(tmp_path)], timeout=300)
    written = [tmp_path / f"hashes-rank{r}.json" for r in (0, 1)]
    assert all(path.is_file() for path in written), proc.stderr[-4000:]
    hashes = [json.loads(path.read_text()) for path in written]
    for phase in ("sync save", "async save", "resume"):
        assert hashes[0][phase] == RANK0, (phase, hashes[0][phase])
        assert hashes[1][phase] == RANK1, (phase, hashes[1][phase])
    assert hashes[0]["resumed step"] == hashes[1]["resumed step"] == 2
    manifest = json.loads(next((tmp_path / "sync" / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert sorted(manifest["files"]) == sorted(RANK0 + RANK1)  # the commit gathered every rank's digests

    assert proc.returncode == 0, proc.stderr[-4000:]
    agree = [json.loads((tmp_path / f"agree-rank{r}.json").read_text()) for r in (0, 1)]
    assert agree[0]["skipped"] == agree[1]["skipped"] == 1
    assert agree[0]["finite"] and agree[1]["finite"] and agree[0]["weights_sum"] == agree[1]["weights_sum"]
    log = (tmp_path / "skip" / "logs" / "rank0.log").read_text()
    assert "step 2: the loss is not finite (nan or inf) on rank(s) 1; skipped its update on every rank" in log
    for rank in (0, 1):
        assert f"is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in agree[rank]["refused"]


def test_a_rank_finds_its_own_files_without_a_stat_of_everyone_elses(tmp_path, monkeypatch):
    """At W ranks a checkpoint holds 2W+ files (a DCP shard and an RNG state per rank), and every rank lists it to
    find the files it wrote: a stat of every file was W x 2W metadata operations per save, job-wide (2 million at
    1,024 ranks, on a shared filesystem's metadata server). A rank now stats and hashes only its own files."""
    world = 64
    for name in ["trainer_state.json", "dcp/.metadata"] + [f for r in range(world)
                                                            for f in (f"dcp/__{r}_0.distcp", f"rng/rank{r}.json")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    stat = os.stat
    seen = []
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: seen.append(str(path)) or stat(path, *args,
                                                                                                     **kwargs))
    digests = own_digests(tmp_path, 5, world)
    assert sorted(digests) == ["dcp/__5_0.distcp", "rng/rank5.json"]
    assert sorted(os.path.relpath(p, tmp_path) for p in seen) == ["dcp/__5_0.distcp", "rng/rank5.json"], seen
