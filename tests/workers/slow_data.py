"""Test-only straggler: the built-in digits, fetched slowly on one rank.

Loaded by real workers as ``data.name=slow_data:slow_digits`` (tests/workers/ is on the children's PYTHONPATH,
see conftest.child_env), with ``data.kwargs: {slow_rank: R, delay_s: S}``: the process whose RANK is R sleeps S
seconds in every micro-batch fetch (torch's DataLoader fetches a micro-batch with one ``__getitems__`` call), the
others fetch at full speed. A slow disk or an overloaded host, as one rank of a job sees it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from distrain.data.datasets import digits


class SlowOnOneRank(Dataset):
    """``inner`` with ``delay_s`` of sleep per micro-batch fetch on rank ``slow_rank`` (read from RANK)."""

    def __init__(self, inner: Dataset, slow_rank: int, delay_s: float):
        self.inner, self.spec = inner, getattr(inner, "spec", None)
        self.delay_s = delay_s if int(os.environ.get("RANK", "0")) == slow_rank else 0.0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        return self.inner[index]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.__getitems__(list(indices))  # the digits' own batched fetch: one collated batch


def slow_digits(eval_fraction: float = 0.2, slow_rank: int = 1, delay_s: float = 0.0
                ) -> Tuple[Dataset, Optional[Dataset]]:
    """The digits (train, eval); training micro-batches arrive ``delay_s`` late on rank ``slow_rank``."""
    train, evaluation = digits(eval_fraction=eval_fraction)
    return SlowOnOneRank(train, slow_rank, delay_s), evaluation
