"""MRR and shuffle orders and the grain sampler (a slot per batch)."""

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


class _Split:
    """What a sampler reads of a split."""

    def __init__(self, labels, name="tiny"):
        self.labels, self.class_names, self.name = np.asarray(labels), tuple("abcd"), name


def _grain_batches(sampler, shard, shard_count):
    """Simulate grain: slot p to shard p % S, each slot one batch (read by whichever worker); the
    record keys of each of the shard's batches, in order."""
    return [sampler.records(sampler[i].record_key).tolist() for i in range(shard, len(sampler), shard_count)]


@pytest.mark.parametrize("kind,shard_count", [("shuffle", 1), ("mrr", 3), ("eval", 1), ("eval-shuffled", 1)])
def test_batches_follow_each_epochs_order_and_epochs_follow_each_other(kind, shard_count):
    b, labels = 4, LABELS  # 182 records; MRR: 28 per epoch
    counts = np.bincount(labels, minlength=4)
    options = dict(kind=kind, seed=3, first_epoch=1, last_epoch=4, batch_size=b, shard_count=shard_count)
    sampler = sampling.Sampler(_Split(labels), **options)
    shards = [_grain_batches(sampler, s, shard_count) for s in range(shard_count)]
    steps = sampling.steps_per_epoch(sampling.EpochLabels(_Split(labels)), kind, batch_size=b,
                                     shard_count=shard_count)
    assert {len(batches) for batches in shards} == {3 * steps}  # equal steps on every process
    assert len(sampler) == 3 * steps * shard_count
    epochs = [[key for step in range(e * steps, (e + 1) * steps) for shard in shards for key in shard[step]]
              for e in range(3)]
    if kind.startswith("eval"):  # every record once a pass, the last batch short; passes alike
        assert steps == 46 and epochs[0] == epochs[1] == epochs[2]
        assert sorted(epochs[0]) == list(range(182)) and len(shards[0][steps - 1]) == 182 - 45 * b
        assert (epochs[0] == list(range(182))) == (kind == "eval")
    else:  # whole global batches of distinct records, each epoch its own order (MRR: its own draw)
        size = 4 * counts.min() if kind == "mrr" else 182
        assert steps == size // (shard_count * b) and all(len(set(e)) == len(e) == steps * shard_count * b
                                                          for e in epochs)
        for e, keys in enumerate(epochs):
            order = sampling.epoch_order(sampling.EpochLabels(_Split(labels)), kind=kind, seed=3, epoch=1 + e)
            assert keys == order[:len(keys)].tolist()
        assert epochs[0] != epochs[1]
        if kind == "mrr":
            assert all(np.bincount(labels[e], minlength=4).max() <= counts.min() for e in epochs)


def test_an_evaluation_sampler_refuses_shards_and_an_unknown_kind():
    with pytest.raises(ValueError, match="shard_count must be 1"):
        sampling.Sampler(_Split(LABELS), kind="eval", seed=0, first_epoch=0, last_epoch=1, batch_size=4,
                         shard_count=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        sampling.Sampler(_Split(LABELS), kind="balanced", seed=0, first_epoch=0, last_epoch=1, batch_size=4)


def test_training_shards_are_disjoint_slices_of_each_global_batch():
    sampler = sampling.Sampler(_Split(LABELS[:50]), kind="shuffle", seed=3, first_epoch=0, last_epoch=1,
                               batch_size=4, shard_count=3)
    shards = [_grain_batches(sampler, s, 3) for s in range(3)]
    order = sampling.shuffle_epoch_indices(50, epoch=0, seed=3)
    for step in range(4):  # 50 // 12 global batches; shard s reads the s-th 4 records of each
        np.testing.assert_array_equal(np.concatenate([shard[step] for shard in shards]),
                                      order[step * 12:(step + 1) * 12])


def test_sampler_pickles_and_its_repr_is_stable():
    sampler = sampling.Sampler(_Split(LABELS), kind="mrr", seed=2, first_epoch=1, last_epoch=3, batch_size=4)
    copy = pickle.loads(pickle.dumps(sampler))
    assert repr(copy) == repr(sampler) == (
        "Sampler(split='tiny', kind='mrr', records=182, seed=2, epochs=[1, 3), batch_size=4, shard_count=1)")
    first, again = sampler[5], copy[5]
    assert first.record_key == again.record_key == 5
    np.testing.assert_array_equal(copy.records(5), sampler.records(5))
    np.testing.assert_array_equal(sampler.records(5), sampling.mrr_epoch_indices(LABELS, epoch=1, seed=2)[20:24])
    with pytest.raises(IndexError):
        sampler[len(sampler)]
