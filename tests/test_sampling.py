"""MRR and shuffle orders, the worker-independent layout and the grain sampler."""

import pickle

import numpy as np
import pytest

from arm_jax.data import sampling
from arm_jax.errors import UserError

# Imbalanced like AffectNet, in miniature: class sizes 40, 7, 120, 15.
SIZES = (40, 7, 120, 15)
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), SIZES)).astype(np.int32)


def test_mrr_gives_every_class_the_smallest_class_size_without_repeats():
    order = sampling.mrr_epoch_indices(LABELS, epoch=3, seed=11)
    assert order.size == 4 * min(SIZES) == sampling.mrr_epoch_size(LABELS)
    assert len(set(order.tolist())) == order.size
    np.testing.assert_array_equal(np.bincount(LABELS[order], minlength=4), [min(SIZES)] * 4)


def test_mrr_is_a_pure_function_of_epoch_and_seed():
    same = [sampling.mrr_epoch_indices(LABELS, epoch=5, seed=1) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    other_epoch = sampling.mrr_epoch_indices(LABELS, epoch=6, seed=1)
    other_seed = sampling.mrr_epoch_indices(LABELS, epoch=5, seed=2)
    assert not np.array_equal(same[0], other_epoch)
    assert not np.array_equal(same[0], other_seed)


def test_mrr_draws_different_members_of_a_large_class_each_epoch():
    big = [set(o[LABELS[o] == 2].tolist()) for o in
           (sampling.mrr_epoch_indices(LABELS, epoch=e, seed=0) for e in range(2))]
    assert big[0] != big[1]


def test_mrr_order_is_shuffled_across_classes():
    order = sampling.mrr_epoch_indices(LABELS, epoch=0, seed=0)
    # Grouped by class the labels would change value only 3 times.
    assert np.count_nonzero(np.diff(LABELS[order])) > 10


def test_mrr_names_a_class_without_examples():
    labels = np.array([0, 0, 2, 2, 2], np.int32)
    with pytest.raises(UserError, match="'disgust'"):
        sampling.mrr_epoch_indices(labels, epoch=0, seed=0,
                                   class_names=("angry", "disgust", "fear"))


def test_mrr_coverage_of_the_largest_class_grows_like_fresh_draws():
    # n = 1000 records in the big class, m = 50 per epoch: after E epochs a record has been
    # seen with probability 1 - (1 - m/n)**E; a fixed undersample would stay at m/n.
    labels = np.repeat([0, 1], [50, 1000]).astype(np.int32)
    seen = np.zeros(labels.size, bool)
    for epoch in range(20):
        seen[sampling.mrr_epoch_indices(labels, epoch=epoch, seed=7)] = True
        if epoch + 1 in (1, 5, 20):
            coverage = seen[50:].mean()
            expected = 1 - (1 - 50 / 1000) ** (epoch + 1)
            # Binomial std at n = 1000 is <= 0.016; 0.05 is three of them.
            assert abs(coverage - expected) < 0.05, (epoch + 1, coverage, expected)
    assert seen[:50].all()


def test_shuffle_is_a_permutation_that_changes_per_epoch():
    a = sampling.shuffle_epoch_indices(100, epoch=0, seed=0)
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, sampling.shuffle_epoch_indices(100, epoch=1, seed=0))
    np.testing.assert_array_equal(a, sampling.shuffle_epoch_indices(100, epoch=0, seed=0))


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("shard_count", [1, 3])
def test_layout_gives_each_worker_whole_batches_in_round_robin(drop_remainder, shard_count):
    """Simulate grain: shard p % S, worker q % W, per-worker batching, round-robin merge."""
    n, b = 103, 8
    reference = sampling.epoch_layout(n, batch_size=b, shard_count=shard_count, worker_count=0,
                                      drop_remainder=drop_remainder)
    for workers in (2, 3):
        layout = sampling.epoch_layout(n, batch_size=b, shard_count=shard_count,
                                       worker_count=workers, drop_remainder=drop_remainder)
        for s in range(shard_count):
            want = _grain_batches(reference, s, shard_count, 1, b, drop_remainder)
            got = _grain_batches(layout, s, shard_count, workers, b, drop_remainder)
            assert [g.tolist() for g in got] == [w.tolist() for w in want]
    shards = [set(_flat(_grain_batches(reference, s, shard_count, 1, b, drop_remainder)))
              for s in range(shard_count)]
    assert sum(len(x) for x in shards) == len(set().union(*shards))  # disjoint
    if not drop_remainder:
        assert set().union(*shards) == set(range(n))  # evaluation sees every record
    else:
        assert len({len(x) for x in shards}) == 1  # equal steps on every process


def _grain_batches(layout, shard, shard_count, workers, b, drop_remainder):
    shard_slots = layout[shard::shard_count]
    per_worker = []
    for w in range(workers):
        stream = shard_slots[w::workers]
        stream = stream[stream != sampling.PAD]
        batches = [stream[i:i + b] for i in range(0, len(stream), b)]
        per_worker.append([x for x in batches if len(x) == b or not drop_remainder])
    merged, k = [], 0
    while any(k < len(p) for p in per_worker):
        merged += [p[k] for p in per_worker if k < len(p)]
        k += 1
    return merged


def _flat(batches):
    return [int(i) for x in batches for i in x]


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    order = sampling.shuffle_epoch_indices(50, epoch=0, seed=3)
    sampler = sampling.EpochSampler(order, kind="shuffle", seed=3, epoch=0, batch_size=4,
                                    shard_count=3, worker_count=2, drop_remainder=False)
    parts = [sampler.shard_record_keys(s) for s in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(50))
    metadata = [sampler[i] for i in range(len(sampler))]
    assert {m.record_key for m in metadata} == set(range(50)) | {sampling.PAD}


def test_sampler_pickles_and_its_repr_is_stable():
    order = sampling.mrr_epoch_indices(LABELS, epoch=1, seed=2)
    sampler = sampling.EpochSampler(order, kind="mrr", seed=2, epoch=1, batch_size=4)
    copy = pickle.loads(pickle.dumps(sampler))
    assert repr(copy) == repr(sampler) and "0x" not in repr(sampler)
    first, again = sampler[5], copy[5]
    assert first.record_key == again.record_key == order[5]
    assert first.rng.integers(1 << 30) == again.rng.integers(1 << 30)
    with pytest.raises(IndexError):
        sampler[len(sampler)]


def test_record_rngs_depend_on_the_epoch_position_not_the_layout():
    order = np.arange(20)
    a = sampling.EpochSampler(order, kind="shuffle", seed=0, epoch=0, batch_size=4)
    b = sampling.EpochSampler(order, kind="shuffle", seed=0, epoch=0, batch_size=4,
                              worker_count=3)
    draws = [{m.record_key: m.rng.random() for m in (s[i] for i in range(len(s)))
              if m.record_key != sampling.PAD} for s in (a, b)]
    assert draws[0] == draws[1] and len(set(draws[0].values())) == 20
