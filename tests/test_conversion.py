"""Resume under another strategy (distrain.checkpoint.conversion): the rules as pure functions, and real conversions.

The slow test trains each source strategy straight (the reference) under torchrun, saving half way, and resumes
each case's checkpoint under another strategy at another world size: the converted run must end on the straight
run's parameters (<= 1e-5 relative) after the same samples, hold exactly the saved Adam moments once loaded
(<= 1e-7), say on the console what was converted, and keep the trajectory's config hash. One launch per world size
(tests/workers/strategy_worker.py) runs every source and case of that size.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Dict, List

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import run_torchrun
from distrain.checkpoint.compat import differing_keys
from distrain.checkpoint.conversion import StrategyKind, check_strategy_change, running_kind
from distrain.checkpoint.paths import step_name
from distrain.checkpoint.safe_load import load_full_state
from distrain.config import config_hash, load_config, to_container
from distrain.errors import CheckpointError
from distrain.strategies import strategy_class
from fault_helpers import max_rel_diff

MLP = "configs/mlp.yaml"
# 16 steps, resumed at 8, keep the suite short; the acceptance length (20 + 20) is the same test with
# DISTRAIN_CONVERSION_STEPS=40 (docs/checkpoints.md, "Resume under another strategy", has its numbers).
STEPS = int(os.environ.get("DISTRAIN_CONVERSION_STEPS", "16"))
SAVED, GLOBAL_BATCH = STEPS // 2, 24
COMMON = [f"train.global_batch={GLOBAL_BATCH}", "train.micro_batch=2", "train.optimizer=adamw", "train.lr=0.003",
          "train.weight_decay=0.01", "train.lr_schedule=cosine", "train.warmup_steps=5", "train.eval_every=0",
          f"train.steps={STEPS}", f"checkpoint.every={SAVED}"]
# (the checkpoint's strategy, its world size, this run's strategy overrides, this run's world size): one line a case.
# The source trains STEPS steps straight and saves at SAVED; the case resumes there. Worlds grow (one launch each).
CASES = [
    ("ddp", 2, ["strategy.name=fsdp"], 3),
    ("zero1", 3, ["strategy.name=fsdp"], 4),
    ("fsdp", 3, ["strategy.name=zero1"], 4),
]
if "replicate" in inspect.signature(strategy_class("fsdp").__init__).parameters:  # HSDP: fsdp on a 2-D mesh
    CASES.append(("zero1", 3, ["strategy.name=fsdp", "strategy.kwargs.replicate=2"], 4))


def _case_name(index: int) -> str:
    return f"case{index}"


@pytest.fixture(scope="module")
def conversions(tmp_path_factory) -> Path:
    """Every source and case trained, one torchrun launch per world size (ascending: sources before their cases)."""
    out = tmp_path_factory.mktemp("conversion")
    runs: List[dict] = []
    sources: Dict[str, set] = {}
    for source, source_world, _, world in CASES:
        assert source_world < world, "a case resumes at a larger world size than its source (launch order)"
        sources.setdefault(source, set()).add(source_world)
    for source, worlds in sources.items():
        runs.append({"name": source, "config": MLP, "overrides": [*COMMON, f"strategy.name={source}"],
                     "worlds": sorted(worlds)})
    for index, (source, source_world, overrides, world) in enumerate(CASES):
        ckpt = out / "runs" / f"{source}-w{source_world}" / "checkpoints" / step_name(SAVED)
        runs.append({"name": _case_name(index), "config": MLP, "overrides": [*COMMON, *overrides],
                     "worlds": [world], "resume": str(ckpt), "dump_optim": True})
    (out / "runs.json").write_text(json.dumps(runs))
    for world in sorted({w for run in runs for w in run["worlds"]}):
        proc = run_torchrun(world, ["tests/workers/strategy_worker.py", str(out), str(out / "runs.json")], timeout=900)
        assert proc.returncode == 0, f"the W={world} launch failed:\n{proc.stderr[-3000:]}"
    return out


def _indices(run_dir: Path, world: int) -> List[List[int]]:
    errors = sorted(run_dir.glob("error.rank*.txt"))
    assert not errors, "\n".join(e.read_text() for e in errors)
    return [json.loads((run_dir / f"indices.rank{rank}.json").read_text()) for rank in range(world)]


def _saved_optimizer_state(ckpt: Path) -> Dict[str, object]:
    state = load_full_state(ckpt / "dcp", keys={"optim"})["optim"]["state"]
    return {f"{fqn}.{key}": value for fqn, entries in state.items() for key, value in entries.items()}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-w{c[1]}-to-{'-'.join(o.split('=')[1] for o in c[2])}"
                                                          f"-w{c[3]}" for c in CASES])
def test_a_resume_under_another_strategy_continues_the_same_trajectory(conversions, index):
    source, source_world, overrides, world = CASES[index]
    target = overrides[0].split("=")[1]
    straight_dir, case_dir = conversions / source / f"w{source_world}", conversions / _case_name(index) / f"w{world}"
    straight, consumed = _indices(straight_dir, source_world), _indices(case_dir, world)

    rel = max_rel_diff(load_file(str(straight_dir / "weights.safetensors")),
                       load_file(str(case_dir / "weights.safetensors")))
    print(f"{source} W={source_world} -> {' '.join(overrides)} W={world}: max relative difference {rel:.2e}")
    assert rel <= 1e-5, f"the converted run ends {rel:.3e} (relative) away from {STEPS} straight {source} steps"
    per_rank = GLOBAL_BATCH // source_world
    first_half = [i for rank in straight for i in rank[:SAVED * per_rank]]
    assert sorted(first_half + [i for rank in consumed for i in rank]) == sorted(i for r in straight for i in r)

    ckpt = conversions / "runs" / f"{source}-w{source_world}" / "checkpoints" / step_name(SAVED)
    saved, loaded = _saved_optimizer_state(ckpt), load_file(str(case_dir / "optim.safetensors"))
    assert set(saved) == set(loaded) and any(k.endswith(".exp_avg_sq") for k in saved)
    worst = max((saved[k].double() - loaded[k].double()).abs().max().item() for k in saved)
    print(f"  Adam state after the conversion: max |difference| {worst:.1e} over {len(saved)} tensors")
    assert worst <= 1e-7

    run_dir = conversions / "runs" / f"{_case_name(index)}-w{world}"
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"resuming a {source} checkpoint under {target}" in log and "converted through DCP" in log
    hashes = {json.loads((c / "trainer_state.json").read_text())["config_hash"]
              for c in (ckpt, run_dir / "checkpoints" / step_name(STEPS))}
    assert len(hashes) == 1, "an exact strategy change changed the trajectory's config hash"


# --- the rules, as pure functions -------------------------------------------------------------------------------
def _kind(name: str, kwargs: Dict = None, **recorded) -> StrategyKind:
    """A strategy as a checkpoint records it (``recorded`` overrides what the class says)."""
    cls, kwargs = strategy_class(name), kwargs or {}
    kind = running_kind(cls, {"name": name, "kwargs": kwargs})  # the class carries the flags an instance reads
    return StrategyKind(kind.name, kind.kwargs, recorded.get("exact", kind.exact),
                        recorded.get("portable", kind.portable), kind.engine)


def test_a_strategy_change_converts_between_exact_portable_strategies_and_is_refused_otherwise():
    assert check_strategy_change(_kind("ddp"), _kind("ddp"), "ck") is None
    assert check_strategy_change(_kind("zero1"), _kind("fsdp", {"reshard_after_forward": False}), "ck") == (
        "resuming a zero1 checkpoint under fsdp (strategy.kwargs {'reshard_after_forward': False}): model and "
        "optimizer state converted through DCP")
    assert "under fsdp: model and optimizer" in check_strategy_change(_kind("single"), _kind("fsdp"), "ck")
    # DeepSpeed's own options: its format on both sides, so the resume check names the keys as for any other change
    assert check_strategy_change(_kind("deepspeed", {"stage": 0}), _kind("deepspeed", {"stage": 2}), "ck") is None
    refusals = {
        "deepspeed": (_kind("deepspeed", {"stage": 2}), _kind("fsdp")),
        "to deepspeed": (_kind("ddp"), _kind("deepspeed")),
        "old": (_kind("ddp", exact=None, portable=None), _kind("fsdp")),
        "lossy": (_kind("ddp", {"comm_hook": "fp16"}), _kind("fsdp")),
        "local_sgd": (_kind("ddp"), _kind("local_sgd")),
    }
    said = {}
    for case, (saved, current) in refusals.items():
        with pytest.raises(CheckpointError) as err:
            check_strategy_change(saved, current, "runs/x/checkpoints/step_00000010")
        assert err.value.key == "strategy.name"
        said[case] = str(err.value)
    assert "distrain ckpt export runs/x/checkpoints/step_00000010 --out model.safetensors" in said["deepspeed"]
    assert "distrain.load_model('model.safetensors')" in said["deepspeed"]
    assert "resume under strategy.name=deepspeed" in said["deepspeed"]
    assert "resume under strategy.name=ddp" in said["to deepspeed"]
    assert "written before distrain recorded" in said["old"] and "strategy.name=ddp" in said["old"]
    assert "not exact" in said["lossy"] and "comm_hook" in said["lossy"]
    assert "layout of its own" in said["local_sgd"]


def test_an_exact_strategy_change_keeps_the_trajectory_and_a_model_change_stays_refused():
    ddp, fsdp = load_config(MLP, ["strategy.name=ddp"]), load_config(MLP, ["strategy.name=fsdp"])
    assert config_hash(ddp, strategy_exact=True) == config_hash(fsdp, strategy_exact=True)
    assert config_hash(ddp) != config_hash(fsdp)  # a strategy that is not exact is part of the trajectory
    saved = to_container(ddp)
    assert differing_keys(saved, to_container(fsdp)) == ["strategy.name"]
    assert differing_keys(saved, to_container(fsdp), strategy_converts=True) == []
    other_model = to_container(load_config(MLP, ["strategy.name=fsdp", "model.kwargs.hidden=7"]))
    assert differing_keys(saved, other_model, strategy_converts=True) == ["model.kwargs.hidden"]
    assert config_hash(OmegaConf.create(other_model), True) != config_hash(fsdp, True)
