"""Correctness across scale, with real gloo processes: W ranks x micro-batch b == 1 rank x accumulation.

With a fixed global batch (24), W=1 (accumulation 6), W=2 (accumulation 3) and W=3 (accumulation 2) must end
at the same parameters after 30 fp32 steps, and consume exactly the same samples.
"""

import pytest

from distrain.verify import verify

CASES = {
    "mlp-sgd": ("configs/mlp.yaml", ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9"]),
    # AdamW with decoupled weight decay on every parameter (decay_exclude=[]); the default groups, which spare
    # biases, norms and embeddings, are what gpt-adamw (gpt.yaml decays with 0.1) and tests/test_strategies.py
    # run. On this ReLU MLP, biases left undecayed let a hidden unit all but die in seed 0's 30 steps: one weight
    # of the next layer then gets gradients whose sign is rounding noise, which Adam's normalisation turns into
    # full steps (2e-6 apart at W=3, 1.5e-5 relative; 1.3e-6-1.7e-6 with seeds 1 and 2). The same amplification
    # is why the built-in gpt's attention has no key bias.
    "mlp-adamw": ("configs/mlp.yaml", ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.01",
                                       "train.decay_exclude=[]"]),
    "gpt-sgd": ("configs/gpt.yaml", ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9",
                                     "data.kwargs.max_chars=200000"]),
    "gpt-adamw": ("configs/gpt.yaml", ["train.optimizer=adamw", "data.kwargs.max_chars=200000"]),
}
COMMON = ["train.global_batch=24", "train.micro_batch=4", "train.warmup_steps=5", "train.eval_every=0"]


# only mlp-adamw runs by default (AdamW is the harder case); the others run with -m slow (CI), to keep the default
# run under 15 minutes on 2 cores
@pytest.mark.parametrize("case", [c if c == "mlp-adamw" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_world_sizes_1_2_3_reach_the_same_parameters(case, repo):
    config, overrides = CASES[case]
    rows = verify(str(repo / config), [1, 2, 3], COMMON + overrides, steps=30)
    assert [r.grad_accum for r in rows] == [6, 3, 2]
    for r in rows:
        assert r.same_indices, f"world size {r.world_size} consumed different samples"
        assert r.max_rel_diff <= 1e-5, f"world size {r.world_size}: max relative difference {r.max_rel_diff:.3e}"
