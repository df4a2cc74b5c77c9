"""Out of memory (issue 19): train.micro_batch=auto redoes a step that ran out of memory on any rank at the next
smaller divisor, with nothing else changed; every other OOM ends the run in one paragraph, exit 1.

The OOM is the real exception type (torch.OutOfMemoryError) raised on the last rank by tests/workers/oom_injection.py, in
the forward, in a non-last micro-step's backward, and in the last (syncing) backward after DDP launched some bucket
all-reduces; real processes on gloo (tests/workers/oom_worker.py). ``auto`` must equal a run at the fixed micro-batch
it finds: the same samples in every step and the same weights (max relative difference <= 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli, run_torchrun
from distrain.config import batch_plan, load_config
from distrain.config.validation import smaller_plan
from distrain.env import ProcessInfo
from distrain.errors import ConfigError
from distrain.strategies import StrategyContext, build_strategy
from distrain.training.micro_steps import MicroSteps
from distrain.training.trainer import Trainer
from oom_injection import IndexedData, OOMNet

TINY_BUCKETS = "strategy.kwargs.bucket_cap_mb=0.0001"  # one bucket per parameter or two: some launch before the OOM
CASES = {  # where: (overrides, after): micro_batch_max=4 gives 2 micro-steps at the first size tried
    "forward": ([], 0),
    "backward": (["train.micro_batch_max=4"], 0),
    # step 0 settles at 4 (no injection yet); step 1's last backward fails after DDP rebuilt its buckets, so the
    # later layers' buckets are already all-reduced when it raises
    "last_backward": ([], 2),
}
STRATEGIES = {"ddp": [TINY_BUCKETS], "zero1": [TINY_BUCKETS], "accelerate": ["strategy.kwargs.bucket_cap_mb=0.0001"],
              "local_sgd": [],
              # each Linear its own FSDP unit: a failed rank has issued some units' all-gathers (and, in the last
              # backward, the later layers' reduce-scatters) when it raises
              "fsdp": ["strategy.kwargs.wrap=[Linear]"]}


def test_auto_plan_starts_at_the_largest_divisor_and_walks_down():
    cfg = load_config(None, ["train.micro_batch=auto", "train.global_batch=24"])
    plan, sizes = batch_plan(cfg, 2), []
    while plan is not None:
        assert plan.auto and plan.micro_batch * plan.grad_accum == 12
        sizes.append(plan.micro_batch)
        plan = smaller_plan(plan)
    assert sizes == [12, 6, 4, 3, 2, 1]
    capped = load_config(None, ["train.micro_batch=auto", "train.micro_batch_max=5", "train.global_batch=24"])
    assert batch_plan(capped, 2).micro_batch == 4


@pytest.mark.parametrize("value", ["0", "abc", "true"])
def test_micro_batch_values_refused_in_one_paragraph(value):
    with pytest.raises(ConfigError, match="positive integer, null .* or auto"):
        load_config(None, [f"train.micro_batch={value}"])


def _case(strategy: str, where: str) -> dict:
    overrides, after = CASES[where]
    return {"name": f"{strategy}-{where}", "strategy": strategy, "where": where, "limit": 2, "after": after,
            # dropout draws per micro-batch, so only runs cut alike from the start can match: the redone step
            # must draw what the failed attempt drew (its random state put back)
            "dropout": 0.0 if after else 0.3,
            "overrides": [*STRATEGIES[strategy], *overrides, *(["train.micro_batch_max=4"] if after else [])]}


# The default run keeps two cases, the protocol's two hard points: a DDP rank that fails in the last backward after
# some buckets were all-reduced, and a redone step that must draw the dropout its failed attempt drew (zero1, in
# the forward). -m slow runs the rest of the matrix, one launch per world size.
REPRESENTATIVE = [("ddp", "last_backward"), ("zero1", "forward")]
MATRIX = [(s, w) for s in ("ddp", "zero1", "accelerate", "fsdp") for w in CASES] + [("local_sgd", "last_backward")]


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for key, value in a.items():
        x, y = torch.tensor(value, dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64)
        worst = max(worst, ((x - y).abs().max() / (y.abs().max() or 1.0)).item())
    return worst


def _check_auto_equals_fixed(tmp_path: Path, world: int, cases: list) -> None:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_torchrun(world, ["tests/workers/oom_worker.py", str(tmp_path), str(tmp_path / "cases.json")],
                        timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in cases:
        result = json.loads((tmp_path / f"{case['name']}.rank0.json").read_text())
        auto, fixed = result["auto"], result["fixed"]
        assert auto["micro_batch"] == fixed["micro_batch"] == 2, case["name"]
        assert auto["steps"] == fixed["steps"], f"{case['name']}: another sample multiset in some step"
        assert _max_rel(auto["weights"], fixed["weights"]) <= 1e-5, case["name"]
    assert proc.stderr.count("out of memory at step") >= len(cases)


def test_auto_after_an_injected_oom_equals_the_fixed_micro_batch(tmp_path):
    _check_auto_equals_fixed(tmp_path, 2, [_case(*c) for c in REPRESENTATIVE])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_auto_equals_the_fixed_micro_batch_for_every_strategy_and_injection_point(tmp_path, world):
    matrix = [c for c in MATRIX if world == 3 or c not in REPRESENTATIVE]
    _check_auto_equals_fixed(tmp_path, world, [_case(*c) for c in matrix if world == 2 or c[0] != "local_sgd"])


def _train_cli(tmp_path: Path, *overrides: str):
    return run_cli(["launch", "--nproc-per-node", "2", str(REPO / "configs" / "quickstart.yaml"),
                    f"run.dir={tmp_path}", "train.steps=2", "train.eval_every=0", "metrics.progress=none",
                    "model.name=oom_injection:oom_classifier", "model.kwargs.rank=1", "train.global_batch=16",
                    *overrides], timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,size", [(["train.micro_batch=4", "model.kwargs.limit=2"], 4),
                                            (["train.micro_batch=auto", "model.kwargs.limit=0"], 1)])
def test_an_oom_that_cannot_be_retried_ends_in_one_paragraph(tmp_path, overrides, size):
    proc = _train_cli(tmp_path, *overrides)
    assert proc.returncode == 1, proc.stderr[-3000:]
    text = " ".join(proc.stderr.split())  # the CLI wraps its paragraph
    assert (f"Out of memory at step 0 with train.micro_batch={size} (strategy ddp): rank 1 in the forward "
            f"of micro-step 0") in text, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_auto_is_refused_where_a_strategy_cannot_redo_a_step(tmp_path):
    proc = run_cli(["train", str(REPO / "configs" / "quickstart.yaml"), f"run.dir={tmp_path}", "train.steps=1",
                    "strategy.name=deepspeed", "train.micro_batch=auto", "metrics.progress=none"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.micro_batch=auto is not supported by strategy.name='deepspeed'" in " ".join(proc.stderr.split())


def test_auto_is_refused_under_hsdp_and_taken_by_plain_fsdp():
    """HSDP's gradient all-reduce over the replicate group is not counted by fsdp_oom's ledger: refused before any
    model is sharded (the strategy is built for rank 0 of 4, as the Trainer builds it, and never set up)."""
    cfg = load_config(None, ["strategy.name=fsdp", "train.micro_batch=auto", "train.global_batch=16"])
    info = ProcessInfo(rank=0, local_rank=0, world_size=4, local_world_size=4, master_addr="127.0.0.1",
                       master_port=29500, source="torchrun")
    for replicate, refused in ((2, True), (1, False)):
        ctx = StrategyContext(info=info, device=torch.device("cpu"), plan=batch_plan(cfg, 4), train=cfg.train, seed=0)
        strategy = build_strategy("fsdp", ctx, {"replicate": replicate})
        assert strategy.supports_auto_micro_batch is not refused
        if refused:
            with pytest.raises(ConfigError) as err:
                MicroSteps(strategy, None, None, None, None)
            assert err.value.key == "train.micro_batch"
            assert ("not supported by strategy.name='fsdp': strategy.kwargs.replicate=2 makes it HSDP, which "
                    "all-reduces gradients on a second process group") in str(err.value)
            assert "strategy.kwargs.replicate=1 (plain FSDP) can" in str(err.value)


@pytest.mark.parametrize("kwargs, setting", [({"find_unused_parameters": True}, "find_unused_parameters=true"),
                                             ({"static_graph": True}, "static_graph=true"),
                                             ({"comm_hook": "powersgd"}, "comm_hook=powersgd")])
def test_auto_is_refused_with_a_ddp_option_that_cannot_redo_a_step_exactly(kwargs, setting):
    """PowerSGD's error feedback would advance through the dropped attempt (the redone step would differ from the
    fixed micro-batch's); find_unused_parameters and static_graph change the reducer the rejoin goes through.
    The stateless comm hooks (fp16, bf16) are taken."""
    cfg = load_config(None, ["train.micro_batch=auto", "train.global_batch=16"])
    info = ProcessInfo(rank=0, local_rank=0, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                       master_port=29500, source="torchrun")
    ctx = StrategyContext(info=info, device=torch.device("cpu"), plan=batch_plan(cfg, 2), train=cfg.train, seed=0)
    with pytest.raises(ConfigError) as err:
        build_strategy("ddp", ctx, kwargs)
    name = setting.partition("=")[0]
    assert err.value.key == f"strategy.kwargs.{name}"
    assert f"train.micro_batch=auto cannot be combined with strategy.kwargs.{setting}" in str(err.value)
    assert build_strategy("ddp", ctx, {"comm_hook": "bf16"}).supports_auto_micro_batch


@pytest.mark.slow
def test_the_size_found_is_recorded_and_a_resume_starts_from_it_at_the_same_world_size(tmp_path):
    (tmp_path / "cases.json").write_text(json.dumps([{"name": "resume", "where": "forward", "limit": 2,
                                                      "resume": [2, 3]}]))
    proc = run_torchrun(2, ["tests/workers/oom_worker.py", str(tmp_path), str(tmp_path / "cases.json")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "resume-auto"
    assert json.loads((run_dir / "run.json").read_text())["plan"]["micro_batch"] == 2
    changes = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "micro_batch" in r]
    assert changes[0] == {"step": 1, "micro_batch": 2, "grad_accum": 6}
    saved = sorted(run_dir.glob("checkpoints/*/trainer_state.json"))
    assert [json.loads(p.read_text())["micro_batch"] for p in saved] == [2, 2]
    assert proc.stderr.count("out of memory at step") == 4  # 12 -> 6 -> 4 -> 3 -> 2, in the first run only
    log = (run_dir / "logs" / "rank0.log").read_text()  # the console has these at INFO (here: progress=none)
    assert "train.micro_batch=auto: training at micro_batch=2 (x 6 micro-steps) from step 1" in log
    assert "train.micro_batch=auto starts at micro_batch=2, the size the checkpoint trained at" in log
    # another world size: the per-rank share differs, so the search starts again (8 -> 4 -> 2), once
    (tmp_path / "cases.json").write_text(json.dumps([{"name": "resume", "where": "forward", "limit": 2,
                                                      "resume": [4, 5]}]))
    proc = run_torchrun(3, ["tests/workers/oom_worker.py", str(tmp_path), str(tmp_path / "cases.json")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.micro_batch=auto searches again" in (run_dir / "logs" / "rank0.log").read_text()
    assert proc.stderr.count("out of memory at step") == 2
    assert json.loads((run_dir / "run.json").read_text())["plan"]["micro_batch"] == 2
    # and it stays the trajectory of the run at the fixed size it found, through both resumes
    runs = json.loads((tmp_path / "resume.w3.rank0.json").read_text())
    assert _max_rel(runs["auto"]["weights"], runs["fixed"]["weights"]) <= 1e-5


def test_memory_snapshot_on_a_cpu_run_is_accepted_and_said_once(tmp_path, one_thread):
    cfg = {"train": {"global_batch": 8, "steps": 2, "micro_batch": "auto", "log_every": 1},
           "strategy": {"name": "single"}, "metrics": {"progress": "none", "memory_snapshot": True},
           "checkpoint": {"at_end": False}, "run": {"dir": str(tmp_path), "name": "snap"}}
    with Trainer(cfg, model=OOMNet(limit=2, where="forward"), train_data=IndexedData(), loss_fn=F.mse_loss) as trainer:
        trainer.fit()
        assert trainer.micro_steps.plan.micro_batch == 2  # 8 -> 4 -> 2 in one process too (strategy single)
    log = (tmp_path / "snap" / "logs" / "rank0.log").read_text()
    assert log.count("metrics.memory_snapshot=true records the CUDA allocator's history; this run is on cpu") == 1
    assert not (tmp_path / "snap" / "memory").exists()


@pytest.mark.slow
def test_plan_says_which_micro_batch_each_strategy_fits_in_the_device_memory():
    proc = run_cli(["plan", "configs/gpt.yaml", "--world", "2", "--device-memory-gb", "0.006"])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("  ")[0].strip(): line.split()[-1] for line in proc.stdout.splitlines()
            if line.startswith(("ddp ", "fsdp (full shard)"))}
    # gpt: 1.21 MiB of activations per sample; ddp's 1.78 MiB of states leave room for 3 (a divisor of 16: 2),
    # fsdp's full shard 1.08 MiB for 4
    assert rows == {"ddp": "2", "fsdp (full shard)": "4"}
    assert "measured on the meta device" in proc.stdout
    bad = run_cli(["plan", "configs/gpt.yaml", "--world", "2", "--device-memory-gb", "0"])
    assert bad.returncode == 2 and "--device-memory-gb 0 is not allowed" in bad.stderr


@pytest.mark.bench
def test_auto_micro_benchmark_smoke_run(tmp_path):
    proc = run_cli(["bench", "auto_micro", "--smoke", "--out-dir", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(next(tmp_path.glob("*-smoke-auto_micro.json")).read_text())["suites"]["auto_micro"]
    assert result["micro_batch"] == {"fixed": 8, "auto": 8} and result["ratio"]["ratio"] > 0
    # once settled, auto's outcome rides inside the last gradient bucket: not one collective more than fixed
    assert result["collectives"]["auto"] == result["collectives"]["fixed"] != []


# A gpt whose activations need ~2 GiB a sample (embed 4096 x 4 blocks of 2048 tokens): 64 samples a step cannot fit
# on one GPU; SGD keeps its model states near 7 GiB.
BIG_GPT = ["model.kwargs.embed=4096", "model.kwargs.heads=32", "model.kwargs.layers=4", "data.kwargs.block_size=2048",
           "train.global_batch=64", "train.optimizer=sgd", "train.steps=2", "train.eval_every=0", "train.warmup_steps=0",
           "strategy.name=single", "metrics.progress=none", "metrics.memory_snapshot=true"]


@pytest.mark.gpu
def test_a_real_cuda_oom_is_retried_with_auto_and_reported_with_a_fixed_micro_batch(tmp_path):
    """Never run here (no GPU was lent to issue 19's work): the real CUDA path of docs/out-of-memory.md."""
    proc = run_cli(["train", str(REPO / "configs" / "gpt.yaml"), f"run.dir={tmp_path}", "run.name=auto",
                    "train.micro_batch=auto", *BIG_GPT], gpu=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "auto" / "run.json").read_text())["plan"]["micro_batch"]
    assert found < 64 and (tmp_path / "auto" / "memory" / "oom_rank0_step0.pickle").stat().st_size > 0
    fixed = run_cli(["train", str(REPO / "configs" / "gpt.yaml"), f"run.dir={tmp_path}", "run.name=fixed",
                     "train.micro_batch=64", *BIG_GPT], gpu=True, timeout=1200)
    text = " ".join(fixed.stderr.split())
    assert fixed.returncode == 1 and "Out of memory at step 0 with train.micro_batch=64" in text, text[-3000:]
    assert "GiB allocated" in text and "oom_rank0_step0.pickle" in text and "Traceback" not in fixed.stderr
