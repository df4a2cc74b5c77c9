"""Out-of-memory errors injected as the real exception type: a tiny MLP that raises torch.OutOfMemoryError on one
rank when its micro-batch holds more than ``limit`` samples, in the forward (after its first layer: under FSDP that
layer's all-gather is out), in a non-last micro-step's backward or in the last micro-step's backward (a custom
autograd Function between its first and second layers, so the later layers' gradients, DDP buckets and FSDP
reduce-scatters, are already done when it raises). Every sample's first feature is its index: the model records
which samples each forward saw, per micro-batch size."""

from __future__ import annotations

from collections import Counter
from typing import Any, List, Tuple

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset

FEATURES = 5


def _raise(where: str, size: int) -> None:
    raise torch.OutOfMemoryError(f"CUDA out of memory (injected in the {where} of a micro-batch of {size})")


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, fail_backward: bool) -> torch.Tensor:
        ctx.fail_backward = fail_backward
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        if ctx.fail_backward:
            _raise("backward", grad.shape[0])
        return grad, None


class OOMNet(nn.Module):
    """where: forward | backward (the first micro-step of a step, not the last) | last_backward | none."""

    def __init__(self, limit: int = 10**9, where: str = "none", rank: int = 0, per_rank: int = 8, seed: int = 0,
                 after: int = 0, dropout: float = 0.0):
        """``after``: training forwards that run before the injection arms (so a later step, after DDP has
        rebuilt its buckets in backward order, is the one that fails). ``dropout``: after the second layer, so a
        redone step only matches if it draws the random numbers the failed attempt drew."""
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = nn.Linear(FEATURES, 16), nn.Linear(16, 16), nn.Linear(16, 1)
        self.dropout = nn.Dropout(dropout)
        self.limit, self.where, self.rank, self.per_rank, self.after = limit, where, rank, per_rank, after
        self.calls: Counter = Counter()
        self.records: List[List[int]] = []  # [size, index...] per training forward, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[0]
        micro = self.calls[size] % (self.per_rank // size)
        self.calls[size] += 1
        forwards = sum(1 for r in self.records if r[0] != -1)
        armed = (size > self.limit and self.where != "none" and forwards >= self.after
                 and (not torch_dist.is_initialized() or torch_dist.get_rank() == self.rank))
        h = torch.relu(self.l1(x[:, 1:]))
        if armed and self.where == "forward":  # after the first layer: under FSDP its all-gather has gone out
            _raise("forward", size)
        if torch.is_grad_enabled():
            self.records.append([size, *x[:, 0].long().tolist()])
        fail_backward = armed and ((self.where == "backward" and micro == 0 and self.per_rank // size > 1)
                                   or (self.where == "last_backward" and micro == self.per_rank // size - 1))
        h = _Inject.apply(h, fail_backward)
        return self.l3(self.dropout(torch.relu(self.l2(h)))).squeeze(-1)


class IndexedData(Dataset):
    """n samples (x, y); x[0] is the sample's index, the rest random features."""

    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(1)
        self.x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, FEATURES, generator=g)], 1)
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def steps_seen(records: List[List[int]], per_rank: int) -> List[List[int]]:
    """The samples of each step on this rank: records between step marks ([-1, step], see mark_steps); a step's
    failed attempts come first, its last ``per_rank`` samples are the attempt that trained."""
    steps: List[List[int]] = []
    for size, *indices in records:
        if size == -1:
            steps.append([])
        else:
            steps[-1].extend(indices)
    return [sorted(seen[-per_rank:]) for seen in steps]


def mark_steps(trainer: Any, net: "OOMNet") -> None:
    """Mark where each step starts in ``net.records`` (instrumentation: the trainer's own per-step call, wrapped)."""
    started = trainer.faults.step_started

    def step_started(step: int) -> None:
        net.records.append([-1, step])
        started(step)

    trainer.faults.step_started = step_started


def oom_classifier(spec: Any, limit: int = 0, rank: int = 0) -> nn.Module:
    """For the CLI (model.name=oom_injection:oom_classifier): a linear classifier of the built-in data that runs out
    of memory in its forward on rank ``rank`` when a micro-batch holds more than ``limit`` samples."""
    features = 1
    for n in spec.input_shape:
        features *= n

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(features, spec.num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > limit and torch.is_grad_enabled() and torch_dist.get_rank() == rank:
                _raise("forward", x.shape[0])
            return self.fc(x.flatten(1))

    return Classifier()
