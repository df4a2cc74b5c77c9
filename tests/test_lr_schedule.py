"""The learning-rate schedule as a pure function of the step: linear warmup, then constant or cosine decay."""

from __future__ import annotations

import math

import pytest

from distrain.config import load_config
from distrain.optim import lr_at


def train(*overrides: str):
    return load_config(None, ["train.lr=0.1", *overrides]).train


def test_warmup_rises_linearly_to_the_peak_then_constant_holds_it():
    t = train("train.warmup_steps=4", "train.steps=10")
    assert [lr_at(s, t) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert lr_at(9, t) == 0.1


def test_cosine_decays_from_the_peak_to_the_floor_over_the_remaining_steps():
    t = train("train.lr_schedule=cosine", "train.warmup_steps=2", "train.steps=12", "train.min_lr_ratio=0.1")
    assert lr_at(1, t) == pytest.approx(0.1)  # end of warmup
    assert lr_at(2, t) == pytest.approx(0.1)  # decay starts at the peak
    assert lr_at(7, t) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: the midpoint
    assert lr_at(12, t) == pytest.approx(0.01) and lr_at(50, t) == pytest.approx(0.01)  # the floor, and it stays
    decay = [lr_at(s, t) for s in range(2, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_no_warmup_starts_at_the_peak_and_a_single_step_run_is_defined():
    assert lr_at(0, train()) == 0.1
    assert lr_at(0, train("train.lr_schedule=cosine", "train.steps=1")) == pytest.approx(0.1)
