"""Summaries of timing samples: median and spread (IQR), and ratios of paired rounds.

Pure functions on lists of floats, so the worker, the runner and the report agree on every number.
"""

from __future__ import annotations

import random
import statistics
from typing import Dict, Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between the closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, IQR and count of a sample."""
    return {"median": quantile(values, 0.5), "q1": quantile(values, 0.25), "q3": quantile(values, 0.75),
            "iqr": quantile(values, 0.75) - quantile(values, 0.25), "n": len(values)}


def ratio_of_medians(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0) -> Dict[str, float]:
    """median(a) / median(b) for paired rounds, with a 95% bootstrap interval and the per-round ratio's quartiles.

    ``a[i]`` and ``b[i]`` were measured in the same round, so resampling rounds (not single values) keeps the
    pairing: a slow moment on the machine slows both and cancels in the ratio.
    """
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    point = statistics.median(a) / statistics.median(b)
    rng = random.Random(seed)
    boot = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    per_round = [x / y for x, y in zip(a, b)]
    return {"ratio": point, "ci_lo": quantile(boot, 0.025), "ci_hi": quantile(boot, 0.975),
            "paired_q1": quantile(per_round, 0.25), "paired_median": quantile(per_round, 0.5),
            "paired_q3": quantile(per_round, 0.75), "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Summary of a[i] - b[i] over paired rounds (e.g. a step with gradient sync minus the same step without)."""
    return summary([x - y for x, y in zip(a, b)])

