"""The benchmarks keep running: a smoke run of every suite (marked `bench`: 1.5-3 minutes on 2 cores, depending on
how busy they are) and the command-line front doors (`distrain bench`, `benchmarks/ddp_overhead.py`).

Speed is never asserted here (the CPU is shared): the smoke run checks that each suite measured what it says,
with real gloo processes, and that the report and the plots are written.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env, run_cli

def _smoke(suite: str, tmp_path, timeout: int = 900) -> dict:
    """``python -m benchmarks SUITE --smoke`` into ``tmp_path``; its results file, read."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--smoke", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(next(tmp_path.glob(f"*-smoke-{suite}.json")).read_text())



def test_ddp_overhead_script_runs_from_a_plain_python():
    # Issue 3's benchmark as a script: it finds the repository on its own (the smoke run covers the ddp pair).
    proc = subprocess.run([sys.executable, "benchmarks/ddp_overhead.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "--rounds" in proc.stdout and "--smoke" in proc.stdout


def test_bench_command_lists_the_suites_and_rejects_unknown_ones():
    proc = run_cli(["bench", "--help"])
    assert proc.returncode == 0
    for suite in ("step_time", "comm", "memory", "scaling", "startup", "data", "ddp_overhead", "gpu", "auto_micro"):
        assert suite in proc.stdout
    bad = run_cli(["bench", "no_such_suite"])
    assert bad.returncode == 2 and "no_such_suite" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.bench
def test_smoke_run_of_every_suite(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(next(tmp_path.glob("*-smoke.json")).read_text())
    suites = results["suites"]
    assert list(suites) == ["step_time", "comm", "memory", "scaling", "startup", "data"]
    assert not [name for name, r in suites.items() if "error" in r]

    # 1. every available pair timed in every round, the ddp pair always
    mlp = suites["step_time"]["models"]["mlp"]
    assert "ddp" in [row["label"] for row in mlp["rows"]]
    for row in mlp["rows"]:
        assert len(row["times_distrain"]) == len(row["times_raw"]) == mlp["rounds"]
        assert row["ratio"]["ratio"] > 0 and 0 < row["ratio"]["ci_lo"] <= row["ratio"]["ci_hi"]
    # 2. the profiler saw the gradients all-reduced: 4 bytes per parameter; bf16 sends half
    comm = suites["comm"]
    assert comm["grad_bytes"] == 4 * comm["params"]
    bf16 = next(v for v in comm["variants"] if v["label"] == "hook bf16")
    assert bf16["bytes"]["all_reduce"] == 2 * comm["params"]
    # 3. measured memory agrees with the planner
    from benchmarks.suites.memory import compare

    rows = compare(suites["memory"])
    assert {r["label"] for r in rows} >= {"ddp", "zero1", "fsdp (full shard)"}
    assert all(abs(r["error"]) <= 0.10 for r in rows), [(r["label"], r["error"]) for r in rows]
    # 4. samples/s at W=1 and 2; local SGD with H=4 sends a quarter of ddp's bytes per sample
    scaling = suites["scaling"]
    assert {(r["world"], r["label"]) for r in scaling["rows"]} >= {(1, "ddp"), (2, "ddp")}
    per = scaling["bytes"]["bytes_per_sample"]
    if "local_sgd H=4" in per:
        assert per["local_sgd H=4"]["wire_bytes_per_sample"] == pytest.approx(
            per["ddp"]["wire_bytes_per_sample"] / 4, rel=0.01)
    # 5. a launch reached its first step
    assert suites["startup"]["launch"]["median"] > 0
    # 6. both data comparisons timed every round; the image workload costs milliseconds of CPU per sample
    data = suites["data"]
    assert len(data["workers"]["times"]["0"]) == len(data["workers"]["times"]["2"]) == data["workers"]["rounds"]
    assert data["workers"]["per_sample_cpu_s"] > 5e-4 and data["feed"]["ratio"]["ratio"] > 0

    report = (tmp_path / "smoke" / "BENCHMARKS.md").read_text()
    for title in ("## Targets", "## 1. Step time", "## 2. Communication", "## 3. Memory", "## 4. Scaling",
                  "## 5. Start-up", "## 6. Data loading"):
        assert title in report
    assert len(list((tmp_path / "smoke").glob("*.png"))) >= 3


@pytest.mark.bench
def test_gpu_suite_runs_in_its_tiny_cpu_mode(tmp_path):
    # Without CUDA, `python -m benchmarks gpu` races the same six contestants at a tiny shape on the CPU (inductor
    # compiles three of them: a few minutes on 2 cores); the GPT-2 124M numbers need a GPU.
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--smoke", "--device", "cpu", "--out-dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1800, env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(next(tmp_path.glob("*-smoke-gpu.json")).read_text())["suites"]["gpu"]
    assert result["shape"] == "tiny" and result["peak_flops"] is None
    from benchmarks.suites.gpu import CONTESTANTS

    assert [row["label"] for row in result["rows"]] == list(CONTESTANTS)
    for row in result["rows"]:
        assert len(row["times"]) == result["rounds"] and row["tokens_per_s"] > 0
    assert {"tokens_vs_nanogpt", "overhead", "defaults_vs_eager"} <= set(result["ratios"])
    report = (tmp_path / "smoke-gpu" / "BENCHMARKS.md").read_text()
    assert "## 6. One GPU" in report and "Tiny CPU mode" in report


@pytest.mark.bench
def test_scale_suite_measures_every_cost_at_w_1_and_2(tmp_path):
    # The full suite goes to W = 32 (tens of minutes on 2 cores); the smoke run launches W = 1 and 2 only.
    result = _smoke("scale", tmp_path, timeout=1200)["suites"]["scale"]
    rows = {row["world"]: row for row in result["rows"]}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        # a first step, two saves (steps 2 and 4) each timed, steps timed, rank 0's memory read
        assert row["first_step_s"] > 0 and row["step_s"] > 0 and row["rank0_peak_rss_mb"] > 100
        assert len(row["raw"][0]["checkpoint_s"]) == 2 and row["checkpoint_s"] > 0
    # a checkpoint holds a DCP shard and an RNG state per rank, plus the rank-0 files
    assert rows[2]["checkpoint_files"] - rows[1]["checkpoint_files"] == 2
    assert result["growth"]["checkpoint_files"] > 1
    assert [c["world"] for c in result["commit"]] == [2, 8]
    assert result["commit"][1]["gathered_bytes"] == 4 * result["commit"][0]["gathered_bytes"]
    report = (tmp_path / "smoke-scale" / "BENCHMARKS.md").read_text()
    assert "## 7. Scale" in report and "growth per doubling of W" in report
    assert (tmp_path / "smoke-scale" / "scale.png").is_file()


@pytest.mark.bench
def test_straggler_tracking_cost_suite_runs(tmp_path):
    # Issue 20: step time with metrics.straggler_factor=1.5 vs 0, whole log windows interleaved (mlp only when smoke).
    results = _smoke("stragglers", tmp_path)
    job = results["suites"]["stragglers"]["models"]["mlp"]
    assert job["tracking_active"] and job["log_every"] >= 1
    assert len(job["times_on"]) == len(job["times_off"]) == job["rounds"] and job["ratio"]["ratio"] > 0
    assert 0 < job["added"]["all_reduce_s"] < job["added"]["per_window_s"] and job["added"]["fraction_of_window"] > 0
    assert "## Straggler tracking" in (tmp_path / "smoke-stragglers" / "BENCHMARKS.md").read_text()


@pytest.mark.bench
def test_loop_cost_suite_times_every_piece_of_the_loop_body(tmp_path):
    # Issue 20: distrain's own per-step work, piece by piece, against the mlp and gpt steps (2 gloo ranks).
    result = _smoke("loop_cost", tmp_path)["suites"]["loop_cost"]
    from benchmarks.suites.loop_cost import IN_TOTAL

    for model in ("mlp", "gpt"):
        job = result["models"][model]
        assert set(IN_TOTAL) | {"count_allreduce"} == set(job["pieces_us"])
        assert all(job["per_step_us"][p] > 0 for p in IN_TOTAL)
        assert job["total_us"] == pytest.approx(sum(job["per_step_us"][p] for p in IN_TOTAL))
        # one log step in log_every; the stop agreement: the mean of the steps run as the loop runs them
        assert job["per_step_us"]["metrics"] == pytest.approx(job["pieces_us"]["metrics"]["median"] / job["log_every"])
        assert job["pieces_us"]["faults"]["n"] == result["loop_steps"]
        assert 0 < job["fraction"] < 1 and job["step_us"]["median"] > job["total_us"]
    assert "## distrain's own per-step cost" in (tmp_path / "smoke-loop_cost" / "BENCHMARKS.md").read_text()


def test_the_step_time_report_carries_the_hand_written_attribution_of_its_misses():
    # BENCHMARKS.md is generated: the measured explanation of each step-time miss lives in benchmarks/notes and the
    # report takes it in, so a full regeneration keeps it.
    from types import SimpleNamespace

    from benchmarks.suites import step_time

    row = {"label": "ddp", "raw_label": "torch DDP loop", "ratio": {"ratio": 1.1, "ci_lo": 1.0, "ci_hi": 1.2},
           "cpu_ratio": {"ratio": 1.1, "ci_lo": 1.0, "ci_hi": 1.2}, "distrain": {"median": 3.3e-3, "iqr": 1e-4},
           "raw": {"median": 3e-3, "iqr": 1e-4}}
    job = {"workload": {"params": 10, "global_batch": 64, "micro_batch": 32, "grad_accum": 1, "world_size": 2,
                        "optimizer": "sgd", "precision": "fp32"}, "rows": [row], "notes": [], "rounds": 3, "warmup": 1}
    section = step_time.report({"skipped": {}, "models": {"mlp": job}}, SimpleNamespace(plot_step_time=lambda r: None))
    assert "| ddp | torch DDP loop |" in section.markdown
    assert "where each miss goes" in section.markdown and step_time.NOTES.read_text().strip() in section.markdown
