"""`distrain verify`'s comparison of two worlds' results (the runs themselves: tests/test_cli.py, test_strategies.py)."""

from __future__ import annotations

import torch

from distrain.verify import WorldResult, compare, format_table


def result(world: int, weights: dict) -> WorldResult:
    return WorldResult(world_size=world, grad_accum=4 // world, final_loss=1.0, weights=weights, indices=[0, 1, 2])


def test_equal_weights_compare_equal():
    row = compare(result(1, {"w": torch.ones(3)}), result(2, {"w": torch.ones(3)}))
    assert (row.max_abs_diff, row.max_rel_diff, row.same_indices, row.key_difference) == (0.0, 0.0, True, None)


def test_weights_that_differ_in_their_names_are_a_mismatch_that_names_them():
    """Not a KeyError: the table says MISMATCH and which names only one world has."""
    reference = result(1, {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)})
    other = result(2, {"a": torch.ones(2), "module.b": torch.ones(2)})
    row = compare(reference, other)
    assert row.max_rel_diff == float("inf") and row.key_difference == \
        "only world size 1 has b, c; only world size 2 has module.b"
    table = format_table([row], 1e-5)
    assert "MISMATCH" in table and "world size 2: the weights differ in their names: only world size 1 has b, c" in table


def test_verify_fits_a_micro_batch_larger_than_one_ranks_share_and_leaves_the_rest_to_the_batch_check(capsys):
    """gpt.yaml (global 32, micro 16) at W=4: each rank's share is 8, so verify --worlds 1,4 stopped before training
    ("32 / (16 x 4) is not an integer"); the micro-batch does not shape the trajectory, so verify runs W=4 at 8 and
    says so. A micro-batch within the share is kept, even one that does not divide it (the batch check refuses it)."""
    from distrain.config import load_config
    from distrain.verify.compare import fitted_micro_batch

    gpt = load_config("configs/gpt.yaml")
    assert fitted_micro_batch(gpt, 1) == [] and fitted_micro_batch(gpt, 2) == []
    assert fitted_micro_batch(gpt, 4) == ["train.micro_batch=8"]
    assert "world size 4: train.micro_batch=16 is more than one rank's share (8)" in capsys.readouterr().out
    assert fitted_micro_batch(load_config("configs/gpt.yaml", ["train.micro_batch=3"]), 4) == []
    assert fitted_micro_batch(load_config("configs/gpt.yaml", ["train.micro_batch=auto"]), 4) == []
    assert fitted_micro_batch(gpt, 3) == []  # 32 does not split over 3 ranks: check_job says so
