"""Experiment trackers for real: MLflow (sqlite store) and W&B (offline mode) hold exactly what metrics.jsonl holds,
for a 2-rank quickstart that is stopped and resumed into the same tracker run; a missing package or a dead server
warns once and training finishes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env, read_jsonl, run_cli
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.telemetry.trackers import RunEnd, Trackers
from distrain.telemetry.trackers.base import flatten_params, numeric_metrics
from wandb_offline import history, run_id

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FAST = ["train.log_every=5", "train.eval_every=10", "metrics.progress=plain"]


def _metrics_rows(run_dir: Path) -> list:
    """metrics.jsonl as the trackers see it: (step, {key: float}) per record."""
    return [(r["step"], numeric_metrics(r)) for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """2 ranks to step 10 (checkpoint at the end), then the same run resumed to step 20, all three trackers on."""
    root = tmp_path_factory.mktemp("trackers")
    common = [QUICKSTART, *FAST, f"run.dir={root / 'runs'}", "metrics.trackers=[mlflow,wandb,tensorboard]",
              f"metrics.mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "metrics.mlflow.experiment=trackers-test",
              "metrics.wandb.mode=offline", "metrics.wandb.project=distrain-test",
              # these runs last seconds, while MLflow's first start on a new sqlite file (its schema migrations) took
              # 13 s on this 2-core machine under load: let the trackers finish, as a user with a slow store would
              "metrics.tracker_timeout_s=120"]
    env = {"WANDB_DIR": str(root), "WANDB_SILENT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    outputs = []
    for steps in (10, 20):
        proc = run_cli(["launch", "--nproc-per-node", "2", *common, f"train.steps={steps}"], env=env, timeout=400,
                       cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    return root, root / "runs" / "quickstart", outputs


@pytest.mark.trackers
def test_mlflow_history_equals_metrics_jsonl_across_a_resume(resumed_run):
    from mlflow import MlflowClient

    root, run_dir, outputs = resumed_run
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("trackers-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # the resume continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED"

    rows = _metrics_rows(run_dir)
    assert [step for step, _ in rows] == [5, 10, 10, 15, 20, 20]  # train, train, eval, train, train, eval
    keys = sorted({key for _, metrics in rows for key in metrics})
    for key in keys:
        expected = [(step, metrics[key]) for step, metrics in rows if key in metrics]
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        assert [(m.step, m.value) for m in logged] == expected, key
    assert set(run.data.metrics) == set(keys)

    config = (run_dir / "config.yaml")
    from omegaconf import OmegaConf

    params = flatten_params(OmegaConf.to_container(OmegaConf.load(config), resolve=True))
    assert params["train.steps"] == "20" and run.data.params["train.steps"] == "10"  # the first attempt's value
    assert run.data.tags["resumed.train.steps"] == "20"  # MLflow params cannot change: the resume's is a tag
    for key, value in params.items():
        if key != "train.steps":
            assert run.data.params[key] == value, key
    assert run.data.tags["distrain.checkpoint"] == (run_dir / "checkpoints" / "step_00000020").resolve().as_uri()
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["config.yaml"]
    assert all("tracker" not in out.lower() or "failed" not in out.lower() for out in outputs)


@pytest.mark.trackers
def test_wandb_offline_history_equals_metrics_jsonl_across_a_resume(resumed_run):
    root, run_dir, _ = resumed_run
    ids = json.loads((run_dir / "trackers.json").read_text())
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one offline file per attempt; `wandb sync` uploads both into the one run, in order
    assert {run_id(f) for f in files} == {ids["wandb"]}
    logged = [row for f in files for row in history(f)]
    expected = [{"step": step, **metrics} for step, metrics in _metrics_rows(run_dir)]
    assert logged == expected
    saved = [p.name for p in (run_dir / "wandb").glob("offline-run-*/files/distrain-config.yaml")]
    assert len(saved) == 2


@pytest.mark.trackers
def test_tensorboard_tracker_holds_the_same_scalars(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = resumed_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    expected = [(step, metrics["loss"]) for step, metrics in _metrics_rows(run_dir) if "loss" in metrics]
    assert [s for s, _ in loss] == [s for s, _ in expected]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(loss, expected))  # TB stores float32


SMALL = [QUICKSTART, "strategy.name=single", "train.steps=4", "train.log_every=2", "metrics.progress=plain",
         "train.global_batch=32"]


def _train_small(tmp_path, trackers, env, hide=(), overrides=()):
    """A 4-step one-process run with ``trackers``; ``hide``: packages made unimportable, as on a machine without
    them (a ``sitecustomize`` puts None in sys.modules, which makes ``import`` raise ImportError)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in hide))
    proc = run_cli(["train", *SMALL, f"run.dir={tmp_path / 'runs'}", f"metrics.trackers=[{','.join(trackers)}]",
                    *overrides],
                   env={"PYTHONPATH": f"{shim}:{REPO}", **env}, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / "quickstart" / "metrics.jsonl") if "loss" in r]
    assert steps == [2, 4]
    return proc.stdout + proc.stderr


def test_missing_tracker_packages_warn_once_each_and_training_finishes(tmp_path):
    out = _train_small(tmp_path, ["mlflow", "wandb"], {}, hide=("mlflow", "wandb"))
    for name in ("mlflow", "wandb"):
        assert out.count(f"pip install 'distrain[{name}]'") == 1, out[-3000:]
    assert out.count("Training goes on without it") == 2


def test_a_dead_mlflow_server_warns_once_and_training_finishes(tmp_path):
    from distrain.ports import free_port

    # A port nobody listens on; no HTTP retries, so the failure comes at once instead of after MLflow's backoff.
    out = _train_small(tmp_path, ["mlflow"],
                       {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
                       overrides=[f"metrics.mlflow.tracking_uri=http://127.0.0.1:{free_port()}"])
    assert out.count("tracker mlflow failed") == 1, out[-3000:]
    assert "training goes on" in out


def test_an_unknown_tracker_is_a_config_error(tmp_path):
    proc = run_cli(["train", *SMALL, f"run.dir={tmp_path}", "metrics.trackers=[mlflow,neptune]"])
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "metrics.trackers" in err and "tensorboard, mlflow, wandb" in err
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_an_unreachable_tracker_costs_a_bounded_flush_and_the_run_still_finishes(tmp_path):
    """2 ranks, MLflow at a closed port with its default retries (~2 min of backoff) and dist.timeout_s=30: the run
    exits 0 within 30 s of its last step with one warning naming the tracker; no rank waits in the shutdown barrier
    while rank 0 flushes; run.json says finished and the run directory's lock is released."""
    run_dir = tmp_path / "runs" / "quickstart"
    cmd = [sys.executable, "-m", "distrain", "launch", "--nproc-per-node", "2", QUICKSTART, "train.steps=6",
           "train.log_every=2", "train.eval_every=0", "metrics.progress=plain", "dist.timeout_s=30",
           f"run.dir={tmp_path / 'runs'}", "metrics.trackers=[mlflow]",
           "metrics.mlflow.tracking_uri=http://127.0.0.1:9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=child_env({}), cwd=tmp_path)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    last_step = (run_dir / "metrics.jsonl").stat().st_mtime  # the last record is the last step's
    print(f"the job ended {ended - last_step:.1f} s after its last step")
    assert ended - last_step <= 30, f"the job ended {ended - last_step:.1f} s after its last step"
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == 6
    warnings = [line for line in out.splitlines() if "warning" in line and "tracker mlflow" in line]
    assert len(warnings) == 1, out[-3000:]
    print(warnings[0])
    assert "Traceback" not in out, out[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert not (run_dir / "run.lock").exists()


def test_a_fresh_start_never_replaces_the_tracker_ids_an_earlier_fresh_start_kept(tmp_path):
    """Two fresh starts within one second: the second keeps its predecessor's trackers.json beside the first's."""
    (tmp_path / "trackers.json").write_text('{"mlflow": "second"}\n')
    stamp = int((tmp_path / "trackers.json").stat().st_mtime)
    (tmp_path / f"trackers.{stamp}.json").write_text('{"mlflow": "first"}\n')  # kept by an earlier fresh start
    Trackers.open(load_config(QUICKSTART), tmp_path, fresh=True).close(RunEnd("finished", tmp_path / "config.yaml"))
    assert sorted(p.name for p in tmp_path.glob("trackers*.json")) == [f"trackers.{stamp}-1.json",
                                                                         f"trackers.{stamp}.json"]
    assert (tmp_path / f"trackers.{stamp}.json").read_text() == '{"mlflow": "first"}\n'
    assert (tmp_path / f"trackers.{stamp}-1.json").read_text() == '{"mlflow": "second"}\n'


@pytest.mark.parametrize("value", ["0", "-5", "1e9"])
def test_a_tracker_timeout_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [f"metrics.tracker_timeout_s={value}"])
    assert info.value.key == "metrics.tracker_timeout_s" and "at most 3600" in str(info.value)
