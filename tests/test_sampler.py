from collections import Counter

import pytest

from distrain.data import GlobalStepSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_step_samples_do_not_depend_on_world_size(world):
    s = GlobalStepSampler(num_samples=100, global_batch=12, seed=3)
    for step in range(25):  # crosses several epoch boundaries
        slices = [s.rank_indices(step, r, world) for r in range(world)]
        assert sum(slices, []) == s.step_indices(step)
        assert all(len(x) == 12 // world for x in slices)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = GlobalStepSampler(num_samples=50, global_batch=10, seed=0)
    epoch0 = sum((s.step_indices(i) for i in range(5)), [])
    epoch1 = sum((s.step_indices(i) for i in range(5, 10)), [])
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1


def test_batches_spanning_an_epoch_boundary_are_contiguous_positions():
    s = GlobalStepSampler(num_samples=10, global_batch=4, seed=1)
    stream = sum((s.step_indices(i) for i in range(5)), [])  # 20 positions = 2 epochs
    assert Counter(stream) == Counter(list(range(10)) * 2)
    assert s.epoch_and_offset(3) == (1, 2)


def test_micro_batches_cut_the_rank_slice():
    s = GlobalStepSampler(num_samples=64, global_batch=24, seed=0)
    micro = s.micro_batches(step=2, rank=1, world_size=3, micro_batch=4)
    assert [len(m) for m in micro] == [4, 4] and sum(micro, []) == s.rank_indices(2, 1, 3)


def test_seed_changes_order_and_is_reproducible():
    a, b = GlobalStepSampler(30, 6, seed=1), GlobalStepSampler(30, 6, seed=2)
    assert a.step_indices(0) != b.step_indices(0)
    assert a.step_indices(4) == GlobalStepSampler(30, 6, seed=1).step_indices(4)


def test_a_sampler_is_freed_as_soon_as_it_is_dropped():
    """Its epoch cache is its own: nothing (such as a class-wide lru_cache keyed by the sampler) keeps it alive."""
    import gc
    import weakref

    sampler = GlobalStepSampler(num_samples=100, global_batch=12, seed=3)
    sampler.step_indices(8)  # fills the cache (epoch 0 and 1)
    ref = weakref.ref(sampler)
    gc.disable()  # freed by reference counting alone, not by a later garbage collection
    try:
        del sampler
        assert ref() is None
    finally:
        gc.enable()


def test_the_epoch_cache_stays_small():
    sampler = GlobalStepSampler(num_samples=10, global_batch=10, seed=0)
    orders = [sampler.step_indices(step) for step in range(20)]  # 20 epochs
    assert len(sampler._orders) <= 4
    assert orders[3] == sampler.step_indices(3)  # recomputed after eviction: the same permutation
