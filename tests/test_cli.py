"""The CLI end to end: real runs under torchrun and `distrain launch`, config errors, verify."""

import json

import pytest

from conftest import read_jsonl, run_cli, run_torchrun


def test_launch_quickstart_two_workers_learns_digits(tmp_path, repo):
    proc = run_cli(["launch", "--nproc-per-node", "2", "configs/quickstart.yaml", f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "quickstart"
    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert losses[-1] < losses[0]
    assert evals[-1]["eval_accuracy"] >= 0.90
    assert {"step", "loss", "lr", "samples", "step_time_s", "samples_per_s"} <= set(records[0])
    assert (run_dir / "logs" / "rank0.log").exists() and (run_dir / "logs" / "rank1.log").exists()
    assert "train:" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert "Traceback" not in proc.stderr


def test_torchrun_module_entry_point(tmp_path):
    proc = run_torchrun(2, ["-m", "distrain", "train", "configs/quickstart.yaml", "train.steps=20",
                            f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_jsonl(tmp_path / "quickstart" / "metrics.jsonl")[-2]["step"] == 20


def test_python_api_under_torchrun(tmp_path, repo):
    proc = run_torchrun(2, [str(repo / "examples" / "custom_model.py")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final train loss" in proc.stdout and "6 tensors" in proc.stdout
    records = read_jsonl(tmp_path / "runs" / "custom-sine" / "metrics.jsonl")
    assert records[-1]["eval_loss"] < 0.05


def test_single_process_train(tmp_path):
    proc = run_cli(["train", "configs/mlp.yaml", "train.steps=15", "train.log_every=5", f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 15/15" in proc.stderr


@pytest.mark.parametrize("args, key", [
    (["train", "configs/quickstart.yaml", "train.stepz=3"], "train.stepz"),
    (["train", "configs/quickstart.yaml", "train.steps=abc"], "train.steps"),
    (["train", "configs/quickstart.yaml", "train.micro_batch=48"], "train.micro_batch"),
    (["launch", "--nproc-per-node", "3", "configs/quickstart.yaml"], "train.global_batch"),
    (["launch", "--nproc-per-node", "0", "configs/quickstart.yaml"], "--nproc-per-node"),
    (["train", "configs/nope.yaml"], "configs/nope.yaml"),
    (["config", "show", "configs/quickstart.yaml", "strategy.name=zero9"], "strategy.name"),
    (["train", "configs/quickstart.yaml", "model.name=resnet"], "model.name"),
])
def test_config_errors_exit_2_with_one_paragraph(args, key, tmp_path):
    proc = run_cli(args + [f"run.dir={tmp_path}"] if args[0] != "config" else args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("distrain: error:") and proc.stderr.strip().count("\n\n") == 0


def test_config_show_prints_the_plan():
    proc = run_cli(["config", "show", "configs/quickstart.yaml", "--world-size", "4", "train.micro_batch=8"])
    assert proc.returncode == 0, proc.stderr
    assert "global_batch=64 = micro_batch 8 x grad_accum 2 x world_size 4" in proc.stdout


@pytest.mark.slow  # a long run: with -m slow (CI), to keep the default run under 15 minutes on 2 cores
def test_verify_passes_for_ddp_and_catches_a_strategy_that_skips_gradient_sync():
    common = ["configs/mlp.yaml", "--worlds", "1,2", "--steps", "10", "train.global_batch=16", "train.micro_batch=4"]
    good = run_cli(["verify", *common])
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK" in good.stdout
    bad = run_cli(["verify", *common, "strategy.name=broken_strategy:NoSyncDDP"])  # tests/workers/broken_strategy.py
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "MISMATCH" in bad.stdout and "FAILED" in bad.stdout


def test_building_the_parser_imports_no_benchmarks_and_leaves_sys_path_alone():
    """Every worker builds the whole parser: `distrain bench`'s suites load only when bench itself runs."""
    import subprocess
    import sys

    from conftest import child_env

    probe = ("import sys; before = list(sys.path); from distrain.cli import build_parser; build_parser(); "
             "print('benchmarks.run' in sys.modules, sys.path == before)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.stdout.split() == ["False", "True"], proc.stderr
    bench = run_cli(["bench", "--help"])
    assert bench.returncode == 0 and "--smoke" in bench.stdout  # the suites' own options still show
