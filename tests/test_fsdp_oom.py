"""distrain.strategies.fsdp_oom: an FSDP2 rank that runs out of memory is brought back in step with its peers.

Real gloo ranks (torchrun), the OOM injected as the real exception type (tests/workers/fsdp_oom_worker.py): in a
micro-step's forward, in a non-last micro-step's backward, in the last backward (peers inside reduce-scatters),
and in the last backward with reshard_after_forward=false. After every rank learned of it, the step is dropped and
redone at the next smaller micro-batch; the result equals a run at that micro-batch fixed. Without the recovery
the peers wait in collectives the failed rank never issues and the launch ends only at the process group's
timeout (checked by hand: docs/out-of-memory.md, section FSDP).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_torchrun

CASES = ("forward", "backward_nonlast", "backward_last", "backward_last_zero2")


@pytest.mark.slow  # W=3 only: test_oom's slow matrix runs fsdp through the whole loop at W=2 and W=3
@pytest.mark.parametrize("world", [3])
def test_an_oom_on_one_rank_is_redone_smaller_and_equals_the_fixed_micro_batch(tmp_path, world):
    proc = run_torchrun(world, ["tests/workers/fsdp_oom_worker.py", str(tmp_path)], timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / f"w{world}.json").read_text())
    assert report["fixed"]["tried"] == [[2], [2], [2]]
    for case in CASES:
        run = report[case]
        assert run["tried"] == [[4, 2], [2], [2]], case  # the first step failed at 4, was redone at 2, which stays
        assert run["max_rel_diff"] <= 1e-5, (case, run["max_rel_diff"])
        assert run["fixed_moved"] > 1e-3  # the runs compared did train
        issued = run["issued_before_oom"]
        failed = [rank for rank, counts in enumerate(issued) if counts]
        assert failed == [run["injected_rank"]] and len(issued[failed[0]]) == 1, (case, issued)
    # the failed rank had issued collectives in its micro-step, so its peers were inside later ones: the forward
    # failed after 3 all-gathers (root, block 0, block 1), the last backward after block 2's reduce-scatter
    counts = {case: report[case]["issued_before_oom"][report[case]["injected_rank"]][0] for case in CASES}
    assert counts == {"forward": 3, "backward_nonlast": 8, "backward_last": 9, "backward_last_zero2": 5}


def test_a_replay_input_is_the_first_sample_of_every_tensor_in_the_batch():
    import torch

    from distrain.strategies.fsdp_oom import first_sample

    batch = {"x": torch.arange(12).view(4, 3), "pair": (torch.arange(4), torch.tensor(2.0)), "name": "b"}
    cut = first_sample(batch)
    assert cut["x"].tolist() == [[0, 1, 2]] and cut["pair"][0].tolist() == [0]
    assert cut["pair"][1].item() == 2.0 and cut["name"] == "b"  # a scalar and a non-tensor pass through


def test_the_recovery_needs_the_root_fsdp_module():
    import torch

    from distrain.strategies.fsdp_oom import FSDPOomRecovery, reset_after_oom

    with pytest.raises(TypeError, match="fully_shard"):
        FSDPOomRecovery(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fully_shard"):
        reset_after_oom(torch.nn.Linear(2, 2))
