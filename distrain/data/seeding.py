"""Per-sample randomness that depends on (run seed, step, sample index) only, never on rank, worker or order.

While the loader fetches a sample it sets a *fetch context* (run seed, global step, sample index) in whichever
process does the work: the training process (``data.num_workers=0``) or a DataLoader worker. A dataset draws its
random augmentation from it in one of two ways:

* ``distrain.data.sample_rng()`` — a fresh ``torch.Generator`` seeded for the sample being fetched (pass an
  index, ``sample_rng(i)``, inside a batched ``__getitems__``); or
* the global RNGs (``torch.rand``, ``random.random``, ``numpy.random``), which the loader reseeds from the same
  seed before every ``dataset[i]``, so augmentation code written for a plain DataLoader is reproducible too.

Either way sample i of step s gets the same draws at any world size, with any number of workers, after a resume,
and whichever worker fetches it. The training process's own RNG state is saved and restored around a fetch, so
data loading never moves the RNG that dropout or the model uses. Evaluation fetches under ``EVAL_STEP``, so every
evaluation sees the same draws.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

EVAL_STEP = -1  # the step of every evaluation fetch


@dataclass(frozen=True)
class FetchContext:
    seed: int  # run.seed
    step: int  # the global step whose micro-batch is being fetched; EVAL_STEP during evaluation
    index: Optional[int]  # the sample being fetched; None while a batched __getitems__ fetches several


_CONTEXT: ContextVar[Optional[FetchContext]] = ContextVar("distrain_fetch_context", default=None)


def derive_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, index), stable across Python versions and machines."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fetch_context() -> Optional[FetchContext]:
    """The sample being fetched right now (None outside the loader)."""
    return _CONTEXT.get()


def sample_seed(index: Optional[int] = None) -> int:
    """The seed of sample ``index`` of the step being fetched (default: the sample being fetched now).

    Raises RuntimeError outside the loader, or without an index inside a batched ``__getitems__``.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError("distrain.data.sample_seed()/sample_rng() work while distrain's loader fetches a sample "
                           "(inside the dataset's __getitem__ or __getitems__); there is no sample being fetched now.")
    if index is None:
        if ctx.index is None:
            raise RuntimeError("inside __getitems__ the loader fetches several samples at once: pass the sample's "
                               "index, sample_rng(i) / sample_seed(i).")
        index = ctx.index
    return derive_seed(ctx.seed, ctx.step, int(index))


def sample_rng(index: Optional[int] = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for sample ``index`` of the step being fetched (default: the current one)."""
    return torch.Generator().manual_seed(sample_seed(index))


def seed_globals(seed: int) -> None:
    """Seed the global RNGs a dataset's own random code draws from: torch's CPU generator, Python's, numpy's."""
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's belongs to the training process
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def fetching(seed: int, step: int, index: Optional[int] = None) -> Iterator[None]:
    """Within: the fetch context of (seed, step, index); with an index, the global RNGs reseeded for that sample."""
    token = _CONTEXT.set(FetchContext(seed, step, index))
    try:
        if index is not None:
            seed_globals(derive_seed(seed, step, index))
        yield
    finally:
        _CONTEXT.reset(token)


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore the torch CPU, Python and numpy RNG states on exit (a fetch in the training process reseeds them)."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
