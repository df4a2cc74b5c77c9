"""A token corpus larger than a gigabyte trains from memory-mapped shards: no rank (nor its DataLoader workers)
holds more than a sliver of it. Slow (writes and deletes 1 GiB): run with -m slow."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_torchrun
from distrain.data.shard_writer import random_shards

CORPUS_TOKENS = 2**29 + 2**20  # 1 GiB + 2 MiB of uint16 tokens
VOCAB = 1024  # a small model: its own memory must not hide the data's
LIMIT = 200 * 2**20


@pytest.mark.slow
def test_a_gigabyte_corpus_trains_without_loading_it(tmp_path):
    shards = tmp_path / "corpus"
    try:
        random_shards(shards, VOCAB, CORPUS_TOKENS)
        on_disk = sum(f.stat().st_size for f in shards.glob("*.bin"))
        assert on_disk >= 2**30
        config = tmp_path / "c.yaml"
        config.write_text(f"run: {{name: big, dir: {tmp_path / 'runs'}}}\n"
                          f"model: {{name: gpt, kwargs: {{embed: 32, heads: 2, layers: 1}}}}\n"
                          f"data: {{name: tokens, kwargs: {{path: {shards}, block_size: 256, eval_windows: 64}}, "
                          f"num_workers: 2}}\n"
                          f"train: {{global_batch: 32, micro_batch: 8, steps: 40, eval_every: 0, log_every: 20}}\n"
                          f"metrics: {{progress: none}}\ncheckpoint: {{at_end: false}}\n")
        proc = run_torchrun(2, ["tests/workers/rss_worker.py", str(config), str(tmp_path)], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in (0, 1):
            r = json.loads((tmp_path / f"rss.rank{rank}.json").read_text())
            assert r["steps"] == 40 and r["num_workers"] == 2 and r["windows"] > 2_000_000
            growth = r["after"] - r["before"]
            print(f"rank {rank}: RSS {r['before'] / 2**20:.0f} MiB before the corpus, {r['opened'] / 2**20:.0f} after "
                  f"opening it, {r['after'] / 2**20:.0f} after 40 steps (+{growth / 2**20:.1f} MiB); DataLoader "
                  f"workers' unique memory {[round(u / 2**20, 1) for u in r['worker_uss']]} MiB; corpus "
                  f"{on_disk / 2**30:.2f} GiB")
            assert growth <= LIMIT, f"rank {rank} grew by {growth / 2**20:.0f} MiB"
            assert len(r["worker_uss"]) == 2 and all(u <= LIMIT for u in r["worker_uss"])
    finally:
        shutil.rmtree(shards, ignore_errors=True)  # the gigabyte goes, whatever happened
