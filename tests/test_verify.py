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
