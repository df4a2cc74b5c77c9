"""One rank of a `distrain verify` run: train, then write final weights, loss and consumed sample indices."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

from torch.utils.data import Dataset

from distrain import dist


class RecordingDataset(Dataset):
    """Wraps a dataset and remembers every index fetched through it (the proof of which samples were used)."""

    def __init__(self, inner: Dataset):
        self.inner = inner
        self.spec = getattr(inner, "spec", None)
        self.seen: List[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.inner[i]

    def __getitems__(self, indices: List[int]):
        self.seen.extend(int(i) for i in indices)
        getitems = getattr(self.inner, "__getitems__", None)
        return getitems(indices) if getitems else [self.inner[i] for i in indices]


def main(argv: List[str]) -> int:
    from safetensors.torch import save_file

    from distrain.config import load_config
    from distrain.data import build_datasets
    from distrain.training.trainer import Trainer

    config, out_dir, overrides = argv[0], Path(argv[1]), argv[2:]
    cfg = load_config(config, overrides)
    train, evaluation = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)
    recording = RecordingDataset(train)
    with Trainer(cfg, train_data=recording, eval_data=None) as trainer:
        final = trainer.fit()
        weights = trainer.full_state_dict()
        (out_dir / f"indices.rank{dist.rank()}.json").write_text(json.dumps(recording.seen))
        if dist.rank() == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "weights.safetensors"))
            (out_dir / "result.json").write_text(json.dumps({"loss": final["loss"], "grad_accum": trainer.plan.grad_accum,
                                                             "world_size": trainer.info.world_size}))
    return 0


if __name__ == "__main__":
    from distrain.cli import main as cli_main  # noqa: F401  (same error handling as the CLI)
    from distrain.errors import DistrainError, DistributedError

    try:
        sys.exit(main(sys.argv[1:]))
    except DistrainError as err:
        from distrain.cli import should_report

        if should_report() or isinstance(err, DistributedError):  # the same error on every rank: rank 0 says it
            print(f"distrain verify worker: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
