"""One rank of the memory test: train on token shards, and report this rank's resident memory before the data is
opened and after training, plus each DataLoader worker's unique memory.

    torchrun --nproc-per-node W tests/workers/rss_worker.py CONFIG OUT_DIR [key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(config: str, out_dir: Path, overrides: list) -> None:
    import psutil

    from distrain.training.trainer import Trainer

    me = psutil.Process()
    before = me.memory_info().rss  # imports done, nothing of the corpus opened yet
    with Trainer(config, overrides=overrides) as trainer:
        opened = me.memory_info().rss
        trainer.fit()
        after = me.memory_info().rss
        pids = [w.pid for w in getattr(trainer.loader.keyed.loader._iterator, "_workers", [])]  # persistent workers
        workers = [psutil.Process(pid).memory_full_info().uss for pid in pids]
        report = {"rank": trainer.info.rank, "before": before, "opened": opened, "after": after,
                  "worker_uss": workers, "num_workers": trainer.loader_options.num_workers,
                  "windows": len(trainer.train_data), "steps": trainer.step}
    (out_dir / f"rss.rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
