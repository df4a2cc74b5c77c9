"""Sharded from birth, measured: a ~1.2 GB model (fp32) under fsdp at world size 3 on CPU never exists whole on
any rank. Each rank's peak resident memory (``ru_maxrss``) grows while ``Trainer(...)`` builds it by its shard
(1/3) and a little, against the whole model for an eager build; then two steps run.

Marked slow: four launches of 3 ranks, each building 1.2 GB of parameters (5-15 minutes on 2 shared cores);
one at a time, since the machine is shared. DeepSpeed stage 3 on CPU peaks at ~5 GB per rank in its steps, so
that case needs ~16 GB free and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_torchrun

pytestmark = pytest.mark.slow
FREE_FOR_DEEPSPEED = 16 * 2**30


def _launch(case: str, out: Path) -> list:
    proc = run_torchrun(3, ["tests/workers/large_model_worker.py", case, str(out)], timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(3)]
    for r in ranks:
        r["ratio"] = r["growth"] / r["param_bytes"]
    print(f"{case}: growth during Trainer(...) per rank / full model bytes "
          f"({ranks[0]['param_bytes'] / 2**30:.2f} GiB): {[round(r['ratio'], 3) for r in ranks]}; peak after the "
          f"steps {[round(r['peak_after_steps'] / 2**30, 2) for r in ranks]} GiB")
    return ranks


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def test_fsdp_builds_a_1gb_gpt_and_a_users_model_sharded_from_birth(tmp_path):
    for case in ("fsdp-gpt", "fsdp-user"):
        ranks = _launch(case, tmp_path)
        assert ranks[0]["param_bytes"] >= 2**30
        for r in ranks:
            assert r["model_init"] == "meta"
            assert r["ratio"] <= 0.5, f"{case}: a rank grew by {r['ratio']:.2f} x the model while building it"
            assert math.isfinite(r["loss"])
    eager = _launch("fsdp-gpt-eager", tmp_path)
    for r in eager:
        assert r["model_init"] == "eager" and r["ratio"] >= 1.0, r["ratio"]


def test_deepspeed_stage3_builds_inside_zero_init(tmp_path):
    if _available() < FREE_FOR_DEEPSPEED:
        pytest.skip(f"DeepSpeed stage 3 on CPU needs ~16 GB free for 3 ranks; {_available() / 2**30:.1f} GB are")
    ranks = _launch("deepspeed3-gpt", tmp_path)
    for r in ranks:
        assert r["model_init"] == "meta"
        build = r["growth_until_deepspeed_initialize"] / r["param_bytes"]
        print(f"deepspeed stage 3: model built (zero.Init) {build:.3f} x, then deepspeed.initialize "
              f"{r['ratio'] - build:.3f} x (ZeRO-3's gradient partitions and Adam state, allocated up front)")
        # zero.Init allocates each module whole and frees it once partitioned; distrain.strategies.host_memory makes
        # glibc give that back (without it: 0.58-0.63x here).
        assert build <= 0.5, build
        assert math.isfinite(r["loss"])
