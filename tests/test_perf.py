"""StepTimer.split: how a measured step's time divides into compute and exposed communication."""

from __future__ import annotations

import pytest
import torch

from distrain.telemetry.perf import StepTimer


def timer(micro, **phases) -> StepTimer:
    t = StepTimer(torch.device("cpu"))
    t.micro, t.phases = list(micro), dict(phases)
    return t


def test_the_last_micro_steps_excess_over_the_others_is_exposed_communication():
    split = timer([0.10, 0.10, 0.16], update=0.02).split(world_size=2)
    assert split["comm_s"] == pytest.approx(0.06) and split["compute_s"] == pytest.approx(0.32)


def test_parameter_sync_counts_as_communication():
    split = timer([0.1, 0.1], update=0.02, sync=0.05).split(world_size=4)
    assert split["comm_s"] == pytest.approx(0.05) and split["compute_s"] == pytest.approx(0.22)


def test_a_last_micro_step_faster_than_the_others_exposes_nothing():
    assert timer([0.2, 0.1], update=0.0).split(world_size=2)["comm_s"] == 0.0


def test_one_rank_has_no_communication_and_one_micro_step_cannot_be_split():
    assert timer([0.1, 0.3], update=0.1).split(world_size=1) == {"compute_s": pytest.approx(0.5), "comm_s": 0.0}
    assert timer([0.3], update=0.1).split(world_size=2) == {"compute_s": None, "comm_s": None}
    assert timer([]).split(world_size=2) == {}


def test_only_measured_steps_record_phases():
    t = StepTimer(torch.device("cpu"))
    t.begin(measure=False)
    with t.phase("micro"):
        pass
    assert t.split(world_size=2) == {}
    t.begin(measure=True)
    for name in ("micro", "micro", "update"):
        with t.phase(name):
            pass
    assert len(t.micro) == 2 and set(t.phases) == {"update"}
