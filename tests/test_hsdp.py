"""HSDP: fsdp with strategy.kwargs.replicate=R, a 2-D mesh of R replicas x W/R shards (distrain.strategies.fsdp).

Real gloo processes under torchrun: W ranks at any mesh equal one rank (<= 1e-5, same samples); a 2x2 run resumed at
1x3 and at 2x3 equals the uninterrupted run; the checkpoint holds one copy of each shard (its bytes within 5% of
plain FSDP's); each rank holds 1/S of the parameters. Fast checks: the value rules, the resume compat, the plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, run_cli_here
from distrain.checkpoint.paths import step_name
from distrain.config import load_config, to_container
from distrain.errors import ConfigError
from distrain.preflight import check_job
from distrain.strategies.fsdp import replicas
from distrain.verify import compare, run_world

GPT = str(REPO / "configs" / "gpt.yaml")
# The example GPT (Ψ = 116,352: shards big enough to read in MiB) on shorter sequences: the first 4 steps of its
# AdamW with clipping, inside its 30-step warmup. At full learning rate from step 1 (warmup 1) the MLP's
# down-projections ended 1.7e-5 to 2.2e-5 apart at 2x2 (plain fsdp at W=6, 8 steps: 1.3e-5): hidden units that all
# but die leave gradients whose sign is rounding noise, which Adam turns into whole steps (tests/test_equivalence.py
# explains it for the MLP); the warmup's smaller steps keep that below 1e-5.
COMMON = ["strategy.name=fsdp", "data.kwargs.block_size=32", "data.kwargs.max_chars=200000",
          "train.global_batch=24", "train.micro_batch=2", "train.steps=4",
          "train.eval_every=0", "metrics.progress=none", "checkpoint.at_end=false", "checkpoint.every_minutes=0"]
TOLERANCE = 1e-5


# --- the value rules (no processes) ----------------------------------------------------------------------------
def test_replicate_must_divide_the_world_size_or_be_auto():
    assert replicas(2, 4, 2) == 2 and replicas(3, 6, None) == 3 and replicas(1, 5, 5) == 1
    assert replicas("auto", 8, 4) == 2 and replicas("auto", 4, 4) == 1
    assert replicas(2, 1, 1) == 1  # one process: nothing to shard or replicate (the verify reference)
    with pytest.raises(ConfigError) as err:
        replicas(4, 6, None)
    assert err.value.key == "strategy.kwargs.replicate"
    assert "does not divide the world size 6" in str(err.value) and "1, 2, 3, 6 or auto" in str(err.value)
    with pytest.raises(ConfigError, match="the nodes differ"):
        replicas("auto", 6, 4)
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="whole number of replicas"):
            replicas(bad, 4, 4)


def test_the_declared_range_admits_auto_and_refuses_zero():
    from distrain.config.options import parse_options
    from distrain.strategies.fsdp import FSDPStrategy

    def parse(value):
        return parse_options(FSDPStrategy.__init__, {"replicate": value}, "strategy.kwargs", "strategy 'fsdp'",
                             skip=("self", "ctx"))["replicate"]

    assert parse("auto") == "auto" and parse(2) == 2 and parse_options(
        FSDPStrategy.__init__, {}, "strategy.kwargs", "fsdp", skip=("self", "ctx"))["replicate"] == 1
    with pytest.raises(ConfigError, match=r"replicate' has value 0, which is out of range .* >= 1"):
        parse(0)


def test_an_elastic_job_is_checked_at_every_world_size_it_can_have():
    check_job(load_config(GPT, [*COMMON, "train.global_batch=48", "strategy.kwargs.replicate=2"]), [4, 6, 8])
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        check_job(load_config(GPT, [*COMMON, "strategy.kwargs.replicate=4"]), [4, 6])


def test_a_replicate_that_does_not_divide_is_one_paragraph_and_exit_2(capsys):
    code, _, err = run_cli_here(["config", "show", GPT, "--world-size", "4", *COMMON, "strategy.kwargs.replicate=3"],
                                capsys)
    assert code == 2 and "strategy.kwargs.replicate=3 does not divide the world size 4" in err
    assert "Traceback" not in err and err.strip().count("\n\n") == 0
    code, _, err = run_cli_here(["config", "show", GPT, "--world-size", "1", *COMMON, "strategy.kwargs.replicate=0"],
                                capsys)
    assert code == 2 and "strategy.kwargs.replicate" in err


def test_a_resume_may_change_the_mesh_but_not_the_rest_of_strategy_kwargs():
    from distrain.checkpoint.compat import differing_keys

    plain = to_container(load_config(GPT, COMMON))
    hsdp = to_container(load_config(GPT, [*COMMON, "strategy.kwargs.replicate=2"]))
    assert differing_keys(plain, hsdp) == [] and differing_keys(hsdp, plain) == []
    other = to_container(load_config(GPT, [*COMMON, "strategy.kwargs.replicate=2",
                                           "strategy.kwargs.reshard_after_forward=false"]))
    assert "strategy.kwargs.reshard_after_forward" in differing_keys(hsdp, other)


# --- real processes ----------------------------------------------------------------------------------------------
def _held_params_mib(run_dir: Path) -> float:
    """What rank 0 logged it holds of the parameters after the first step (MiB)."""
    log = (run_dir / "logs" / "rank0.log").read_text()
    return float(re.search(r"rank 0 holds params ([0-9.]+) MiB", log).group(1))


@pytest.mark.slow  # four torchrun jobs, two of them at W=6 on a 2-core machine
def test_hsdp_at_every_mesh_matches_one_rank(tmp_path):
    runs = {"w1": (1, 2), "w4r2": (4, 2), "w6r2": (6, 2), "w6r3": (6, 3)}  # name: (world size, replicate)
    results = {}
    for name, (world, replicate) in runs.items():
        overrides = [*COMMON, f"strategy.kwargs.replicate={replicate}", f"run.dir={tmp_path}", f"run.name={name}",
                     "train.resume=never", "checkpoint.every=0"]
        results[name] = run_world(GPT, world, tmp_path / name / "verify", overrides)
    whole = _held_params_mib(tmp_path / "w1")  # one rank holds the whole model
    for name, (world, replicate) in runs.items():
        if name == "w1":
            continue
        row = compare(results["w1"], results[name])
        assert row.same_indices, f"{name}: consumed other samples than one rank"
        assert row.max_rel_diff <= TOLERANCE, f"{name}: {row.max_rel_diff:.3e} (relative) away from one rank"
        shards = world // replicate  # the parameters are split over one replica's ranks only
        assert _held_params_mib(tmp_path / name) == pytest.approx(whole / shards, abs=0.011), name


def _dcp_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in (checkpoint / "dcp").rglob("*") if f.is_file())


@pytest.mark.slow  # three torchrun jobs, one at W=6
def test_a_2x2_run_resumed_at_1x3_and_2x3_equals_the_uninterrupted_run(tmp_path):
    straight = run_world(GPT, 4, tmp_path / "straight" / "out",
                         [*COMMON, "strategy.kwargs.replicate=2", f"run.dir={tmp_path}", "run.name=straight",
                          "train.resume=never", "checkpoint.every=2"])
    ckpt = tmp_path / "straight" / "checkpoints" / step_name(2)
    first_half = _indices_before(tmp_path / "straight" / "out", 4, steps=2)
    saved: Dict[str, Path] = {"2x2": ckpt}
    for name, world, replicate in (("1x3", 3, 1), ("2x3", 6, 2)):
        out = tmp_path / name / "out"
        resumed = run_world(GPT, world, out, [*COMMON, f"strategy.kwargs.replicate={replicate}", f"run.dir={tmp_path}",
                                              f"run.name={name}", f"train.resume={ckpt}", "checkpoint.every=2"])
        row = compare(straight, resumed)
        assert row.max_rel_diff <= TOLERANCE, f"2x2 -> {name}: {row.max_rel_diff:.3e} from the straight run"
        consumed = [i for rank in range(world) for i in json.loads((out / f"indices.rank{rank}.json").read_text())]
        assert sorted(first_half + consumed) == straight.indices, "samples skipped or repeated across the resume"
        assert f"resume: loaded {ckpt} at step 2" in (tmp_path / name / "logs" / "rank0.log").read_text()
        saved[name] = tmp_path / name / "checkpoints" / step_name(4)
    # One copy of each shard: DCP drops the replicas' duplicates, so HSDP's checkpoint is plain FSDP's size.
    plain = _dcp_bytes(saved["1x3"])
    for name in ("2x2", "2x3"):
        assert _dcp_bytes(saved[name]) <= 1.05 * plain, f"{name}: {_dcp_bytes(saved[name])} B, plain fsdp {plain} B"


def _indices_before(out_dir: Path, world: int, steps: int) -> List[int]:
    """The samples every rank of ``out_dir``'s run consumed in its first ``steps`` steps."""
    per_rank = 24 // world
    return [i for rank in range(world)
            for i in json.loads((out_dir / f"indices.rank{rank}.json").read_text())[:steps * per_rank]]
