"""metrics.profile: torch.profiler traces of steps start..start+steps-1, one gzipped Chrome trace per selected rank,
with distrain's phases labelled; checked config keys; nothing at all when off."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_here
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.telemetry.profiling import label

TINY = ["train.global_batch=8", "train.micro_batch=4", "train.steps=6", "train.eval_every=0", "train.warmup_steps=0",
        "data.kwargs.max_chars=20000", "data.kwargs.block_size=32", "data.eval_fraction=0.01",
        "model.kwargs={embed: 32, heads: 4, layers: 1}", "metrics.progress=plain", "run.name=prof",
        "checkpoint.at_end=false"]
PROFILE = ["metrics.profile.start=3", "metrics.profile.steps=2"]
PHASES = ("split", "forward", "backward", "optimizer", "sync")


def _names(trace: Path) -> collections.Counter:
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    return collections.Counter(e.get("name") for e in events)


@pytest.mark.parametrize("override, key", [
    ("metrics.profile.steps=-1", "metrics.profile.steps"),
    ("metrics.profile.start=-2", "metrics.profile.start"),
    ("metrics.profile.start=299", "metrics.profile.start"),  # start+steps past train.steps=300
    ("metrics.profile.ranks=[0,0]", "metrics.profile.ranks"),
    ("metrics.profile.ranks=[-1]", "metrics.profile.ranks"),
    ("metrics.profile.ranks=some", "metrics.profile.ranks"),
])
def test_bad_profile_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/gpt.yaml", ["metrics.profile.steps=2", override])
    assert err.value.key == key and key in str(err.value)


def test_label_is_a_shared_no_op_when_no_profiler_records():
    # off: one nullcontext for every phase, nothing allocated per call (the run below shows the ranges when on)
    assert label("forward") is label("backward")


def test_a_profiled_run_writes_its_trace_with_the_labelled_phases(tmp_path, capsys, one_thread):
    code, out, err = run_cli_here(["train", "configs/gpt.yaml", *TINY, *PROFILE, f"run.dir={tmp_path}",
                                   "checkpoint.every=4"], capsys)
    assert code == 0, err[-3000:]
    trace = tmp_path / "prof" / "profile" / "rank0_steps3-4.json.gz"
    assert str(trace) in out + err  # the console names the file
    assert sorted(p.name for p in trace.parent.iterdir()) == [trace.name]
    names = _names(trace)
    assert names["ProfilerStep#3"] == names["ProfilerStep#4"] == 1 and not names["ProfilerStep#2"] + names[
        "ProfilerStep#5"]
    assert all(names[p] >= 2 for p in PHASES), {p: names[p] for p in PHASES}  # two steps, each phase
    assert names["checkpoint"] == 1  # checkpoint.every=4: saved after step 4, inside ProfilerStep#4


def test_a_rank_outside_the_world_is_refused_at_start(tmp_path, capsys):
    code, _, err = run_cli_here(["train", "configs/gpt.yaml", *TINY, *PROFILE, "metrics.profile.ranks=[1]",
                                 f"run.dir={tmp_path}"], capsys)
    assert code == 2 and "metrics.profile.ranks" in err and "world_size=1" in err and "Traceback" not in err


@pytest.mark.slow
def test_launch_on_two_ranks_writes_a_trace_per_rank_with_the_gloo_all_reduce(tmp_path):
    proc = run_cli(["launch", "--nproc-per-node", "2", "configs/gpt.yaml", *TINY, *PROFILE, f"run.dir={tmp_path}"],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        trace = tmp_path / "prof" / "profile" / f"rank{rank}_steps3-4.json.gz"
        assert str(trace.name) in proc.stdout + proc.stderr
        names = _names(trace)
        assert names["ProfilerStep#3"] == names["ProfilerStep#4"] == 1
        assert all(names[p] >= 2 for p in (*PHASES, "grad-sync")), dict(names)
        assert names["gloo:all_reduce"] >= 2  # the gradient buckets, one per step at least
