"""One rank of a `distrain verify` run: train, then write final weights, loss and consumed sample indices."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from safetensors.torch import save_file
from torch.utils.data import Dataset

from distrain import dist
from distrain.config import load_config
from distrain.data import build_datasets
from distrain.data.seeding import fetch_context
from distrain.training.trainer import Trainer
from distrain.verify.user_objects import FLAG, trainer_args


class RecordingDataset(Dataset):
    """Wraps a dataset and remembers every index the training loader fetches through it, with its step (the proof
    of which samples each step used).

    The fetches may happen in DataLoader worker processes, so each one appends a line to a file (one ``write`` of a
    few bytes on a file opened for appending: lines from several processes never interleave); ``seen`` reads it
    back ordered by step. Fetches outside the loader (no step: a FLOP count, an inference) are not recorded.
    """

    def __init__(self, inner: Dataset, log: Optional[Path] = None):
        self.inner = inner
        self.spec = getattr(inner, "spec", None)
        self.in_memory = getattr(inner, "in_memory", False)
        self._owner: Optional[int] = None  # the process that made the temporary log, and deletes it
        if log is None:
            fd, name = tempfile.mkstemp(prefix="distrain-seen-", suffix=".txt")
            os.close(fd)
            log, self._owner = Path(name), os.getpid()
        self.log = Path(log)
        if callable(getattr(inner, "__getitems__", None)):  # batched fetches only where the dataset has them
            self.__getitems__ = self._getitems

    def __len__(self) -> int:
        return len(self.inner)

    def _record(self, indices: List[int]) -> None:
        ctx = fetch_context()
        if ctx is None:
            return
        with open(self.log, "a") as f:
            f.write("".join(f"{ctx.step} {int(i)}\n" for i in indices))

    def __getitem__(self, i: int):
        self._record([i])
        return self.inner[i]

    def _getitems(self, indices: List[int]):
        self._record(indices)
        return self.inner.__getitems__(indices)

    def steps(self) -> Dict[int, List[int]]:
        """{step: the indices fetched for it, in fetch order}."""
        out: Dict[int, List[int]] = {}
        for line in self.log.read_text().splitlines():
            step, index = line.split()
            out.setdefault(int(step), []).append(int(index))
        return out

    @property
    def seen(self) -> List[int]:
        """Every index fetched, ordered by step (within a step, in fetch order)."""
        return [i for _, indices in sorted(self.steps().items()) for i in indices]

    def __del__(self) -> None:
        if getattr(self, "_owner", None) == os.getpid():  # not in a forked DataLoader worker
            self.log.unlink(missing_ok=True)


def main(argv: List[str]) -> int:

    config, out_dir, rest = argv[0], Path(argv[1]), argv[2:]
    args = trainer_args(rest.pop(0).split("=", 1)[1]) if rest and rest[0].startswith(FLAG + "=") else {}
    cfg = load_config(config, rest)
    if "train_data" not in args:
        args["train_data"] = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)[0]
    recording = RecordingDataset(args.pop("train_data"))
    with Trainer(cfg, train_data=recording, eval_data=None, **args) as trainer:
        recording.seen.clear()  # a user model's FLOPs are counted on sample 0: only training's reads count
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
