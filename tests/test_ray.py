"""distrain inside Ray Train (``distrain ray`` / distrain.integrations.ray) on a local Ray cluster with 2 CPU
workers on gloo: the parameters equal a torchrun run of the same config, and a worker killed mid-run is restarted
by Ray (FailureConfig max_failures) and resumes from ``ray.train.get_checkpoint()`` to the same parameters.
Marked ``ray`` (a Ray cluster takes ~30 s to start here; run with ``-m ray``; needs ``pip install 'distrain[ray]'``).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from fault_helpers import (FAST, PYTHON, QUICKSTART, REPO, STEPS, load_weights, max_rel_diff, reference_weights,
                           worker_env)

pytestmark = pytest.mark.ray
pytest.importorskip("ray.train.torch")

CHECKPOINTS = ["checkpoint.every=10"]


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory) -> dict:
    return reference_weights(tmp_path_factory.mktemp("torchrun"), CHECKPOINTS)


def distrain_ray(root, *extra, **env) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "distrain", "ray", QUICKSTART, "--workers", "2", *extra, *FAST, *CHECKPOINTS,
           f"run.dir={root / 'runs'}"]
    return subprocess.run(cmd, env=worker_env(root / "out", RAY_ADDRESS="", **env), capture_output=True, text=True,
                          timeout=500, cwd=root)


def test_two_ray_workers_equal_torchrun(torchrun_weights, tmp_path):
    proc = distrain_ray(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    diff = max_rel_diff(torchrun_weights, load_weights(tmp_path / "out", STEPS))
    print(f"Ray Train (2 workers) vs torchrun (2 ranks): max relative difference {diff:.3e}")
    assert diff <= 1e-5
    # Ray kept both checkpoints distrain committed.
    assert sorted(p.name for p in (tmp_path / "runs" / "ray" / "quickstart").glob("step_*")) == \
        ["step_00000010", "step_00000020"]


def test_a_killed_worker_is_restarted_by_ray_and_resumes_exactly(torchrun_weights, tmp_path):
    once = tmp_path / "killed-once"
    # 0.4 s per step: Ray registers a reported checkpoint asynchronously, so the kill comes ~2 s after the report.
    proc = distrain_ray(tmp_path, "--max-failures", "1", DISTRAIN_TEST_KILL="1:16", DISTRAIN_TEST_ONCE=str(once),
                        DISTRAIN_TEST_STEP_DELAY="0.4")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert once.exists()  # rank 1 did kill itself with SIGKILL inside step 16
    resumed = (tmp_path / "runs" / "quickstart" / "logs" / "rank0.log").read_text()
    assert f"resumed from Ray's checkpoint {tmp_path / 'runs' / 'ray' / 'quickstart' / 'step_00000010'}" in resumed
    diff = max_rel_diff(torchrun_weights, load_weights(tmp_path / "out", STEPS))
    print(f"Ray Train with a worker killed in step 16, restarted from step 10 vs uninterrupted torchrun: "
          f"max relative difference {diff:.3e}")
    assert diff <= 1e-5


def test_the_ray_example_trains_a_users_own_model(tmp_path):
    proc = subprocess.run([PYTHON, str(REPO / "examples" / "ray_train.py"), "--steps", "100"], cwd=tmp_path,
                          env=worker_env(tmp_path / "out", RAY_ADDRESS=""), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = tmp_path / "runs" / "ray-products" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "ray-products/step_00000100" in proc.stdout
