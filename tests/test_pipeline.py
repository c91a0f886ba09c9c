"""The grain loader: batch format, determinism, sharding, resume, host staging."""

import jax
import numpy as np
import pytest

from arm_jax.data import pipeline, sampling, transforms
from arm_jax.data.base import ArraySplit, LabelledSplit
from arm_jax.errors import UserError


class TinySplit(LabelledSplit):
    """In-memory LabelledSplit: record i is a constant image of value 4 * i (robust id)."""

    def __init__(self, n=60, side=16, channels=1, labels=None, name="tiny/train"):
        super().__init__(name, ("angry", "happy", "sad"), np.arange(n) % 3 if labels is None else labels)
        self.side, self.channels = side, channels

    def image(self, i):
        image = np.full((self.side, self.side, self.channels), 4 * i % 256, np.uint8)
        image[0, 0] = 255 - image[0, 0]  # an asymmetric pixel, so flips would show
        return image


class RecordByRecord:
    """A split that offers nothing but `split[i]` (what grain's random-access sources offer)."""

    def __init__(self, split):
        self.split, self.labels, self.class_names, self.name = split, split.labels, split.class_names, split.name

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split[i]


def _ids(batch):
    """Record ids of a batch; the median is robust to flips, noise and the marker pixel."""
    return np.rint(np.median(batch["image"].reshape(len(batch["image"]), -1), axis=1) / 4)


def _loader(split, **kw):
    defaults = dict(batch_size=8, seed=0, epoch=0, train=True, image_size=16,
                    shard_index=0, shard_count=1)
    return pipeline.make_loader(split, **{**defaults, **kw})


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys() == {"image", "label"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_format_and_steps():
    split = TinySplit(n=60)
    train = list(_loader(split))
    assert len(train) == pipeline.steps_in_epoch(split, 8, sampler="shuffle", train=True) == 7
    batch = train[0]
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 16, 16, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    evaluation = list(_loader(split, train=False))
    assert [len(b["label"]) for b in evaluation] == [8] * 7 + [4]
    assert pipeline.steps_in_epoch(split, 8, sampler="mrr", train=False) == 8
    np.testing.assert_array_equal(np.concatenate([_ids(b) for b in evaluation]), np.arange(60))


@pytest.mark.parametrize("sampler", ["shuffle", "mrr"])
def test_training_rows_are_the_records_at_their_positions_unaugmented(sampler):
    """Row r of training batch j is, untouched (augmentation is the device's), the record that the
    epoch's order holds at batch_positions(epoch, j)[r], for each of 3 shards: the positions the
    device draws augmentations from name the records they were drawn for."""
    split = TinySplit(n=61, labels=np.repeat([0, 1, 2], [25, 16, 20]))
    for shard in range(3):
        for epoch in (0, 2):
            order = sampling.epoch_order(sampling.EpochLabels(split), kind=sampler, seed=5, epoch=epoch)
            batches = list(_loader(split, sampler=sampler, seed=5, epoch=epoch, batch_size=4, shard_index=shard,
                                   shard_count=3))
            assert batches
            for step, batch in enumerate(batches):
                where = pipeline.batch_positions(epoch, step, batch_size=4, shard_index=shard, shard_count=3)
                assert (where["epoch"] == epoch).all() and where["position"].dtype == np.int32
                expected = np.stack([split[int(i)]["image"] for i in order[where["position"]]])
                np.testing.assert_array_equal(batch["image"], expected)


@pytest.mark.parametrize("train", [True, False])
def test_a_split_read_by_one_gather_gives_the_batches_read_record_by_record(train):
    """A split holding its pixels in one array is read a batch at a time (one gather); a split read
    record by record gives the same batches, the same labels on the same rows."""
    tiny = TinySplit(n=61, labels=np.random.default_rng(2).integers(0, 3, 61))
    gathered = ArraySplit(tiny.name, tiny.class_names, tiny.labels, np.stack([tiny.image(i) for i in range(61)]))
    assert isinstance(gathered.read_images(np.array([3, 1])), np.ndarray)
    for split in (gathered, RecordByRecord(tiny)):
        _same(list(_loader(split, train=train, batch_size=4)), list(_loader(tiny, train=train, batch_size=4)))


def test_same_seed_same_batches_and_other_seed_differs():
    split = TinySplit()
    _same(list(_loader(split, seed=3)), list(_loader(split, seed=3)))
    other = list(_loader(split, seed=4))
    assert not np.array_equal(_ids(other[0]), _ids(list(_loader(split, seed=3))[0]))


def test_mrr_loader_balances_each_epoch():
    labels = np.repeat([0, 1, 2], [30, 8, 22])
    split = TinySplit(labels=labels)
    batches = list(_loader(split, sampler="mrr", batch_size=4))
    assert len(batches) == pipeline.steps_in_epoch(split, 4, sampler="mrr", train=True) == 6
    np.testing.assert_array_equal(np.bincount(np.concatenate([b["label"] for b in batches])),
                                  [8, 8, 8])


def test_mrr_rejects_a_missing_class_and_too_small_epochs():
    with pytest.raises(UserError, match="'sad'"):
        _loader(TinySplit(labels=[0, 1] * 10), sampler="mrr")
    with pytest.raises(UserError, match="batch size"):
        _loader(TinySplit(n=6), batch_size=8)


def test_shards_are_disjoint_and_equal_in_steps():
    split = TinySplit(n=61)
    shards = [list(_loader(split, shard_index=s, shard_count=3, batch_size=4)) for s in range(3)]
    ids = [np.concatenate([_ids(b) for b in shard]).astype(int) for shard in shards]
    union = np.concatenate(ids)
    assert len(set(union.tolist())) == union.size == 5 * 12
    assert {len(s) for s in shards} == {pipeline.steps_in_epoch(split, 4, sampler="shuffle", train=True,
                                                                shard_count=3)} == {5}
    with pytest.raises(ValueError, match="evaluation reads the whole split in every process"):
        _loader(split, train=False, shard_index=1, shard_count=3)


def test_eval_shuffle_follows_the_seed_and_every_pass_is_the_same():
    """Evaluation passes read the same batches (a pass's last one short, no blank row left), shuffled by
    the seed alone: with the batch GAR a prediction depends on its batch-mates."""
    split = TinySplit()
    plain = np.concatenate([_ids(b) for b in _loader(split, train=False, shuffle_eval=True)])
    again = np.concatenate([_ids(b) for b in _loader(split, train=False, shuffle_eval=True, epoch=1)])
    other = np.concatenate([_ids(b) for b in _loader(split, train=False, shuffle_eval=True, seed=1)])
    np.testing.assert_array_equal(plain, again)
    assert sorted(plain.tolist()) == list(range(60)) and not np.array_equal(plain, other)
    one_pass = list(_loader(split, train=False, shuffle_eval=True, batch_size=7))
    assert [len(b["label"]) for b in one_pass] == [7] * 8 + [4]
    _same(list(_loader(split, train=False, shuffle_eval=True, batch_size=7, epoch=None, epochs=(0, 3))),
          one_pass * 3)


def test_restore_mid_epoch_continues_with_the_same_batches():
    split = TinySplit()
    full = list(_loader(split, sampler="mrr"))
    iterator = iter(_loader(split, sampler="mrr"))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    resumed = iter(_loader(split, sampler="mrr"))
    resumed.set_state(state)
    _same(list(resumed), full[3:])


class TexturedSplit(TinySplit):
    """Random RGB textures, so resize conventions show (constant images hide them)."""

    def image(self, i):
        return np.random.default_rng(i).integers(0, 256, (self.side, self.side, 3), np.uint8)


def test_host_staging_matches_device_resize_after_preprocessing():
    split = TexturedSplit(n=16, side=12, channels=3)
    device = next(iter(_loader(split, train=False, image_size=20)))
    host = next(iter(_loader(split, train=False, staging_size=20, image_size=20)))
    assert device["image"].shape == (8, 12, 12, 3) and host["image"].shape == (8, 20, 20, 3)
    a = transforms.device_preprocess(device["image"], image_size=20)
    b = transforms.device_preprocess(host["image"], image_size=20)
    # Host staging rounds to uint8 (PIL's fixed-point filter): under one grey level,
    # i.e. 1/255/0.224 in normalised units; a different convention would miss by far more.
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() <= 1 / 255 / 0.224 and diff.mean() < 0.4 / 255 / 0.224


def test_variable_size_images_are_staged_on_the_host():
    """Each image is RESIZED to the staging size (not cropped or padded): checked per image."""

    class MixedSizes(TexturedSplit):
        def image(self, i):
            side = 10 + i % 3  # 10, 11, 12 px
            return super().image(i)[:side, :side]

    def resized(image, side):  # second implementation: jax.image.resize, the device convention
        out = jax.image.resize(image.astype(np.float32), (side, side, 3), "bilinear", antialias=True)
        return np.asarray(out)

    split = MixedSizes(n=12, side=12)
    for options, side in ((dict(image_size=16), 16), (dict(staging_size=10), 10)):
        batch = next(iter(_loader(split, train=False, **options)))
        assert batch["image"].shape == (8, side, side, 3)
        for i in range(8):  # evaluation batches are in file order
            native = split[i]["image"]
            difference = np.abs(batch["image"][i].astype(np.float32) - resized(native, side))
            assert difference.max() <= 2.0, (i, native.shape, side)  # uint8 rounding of two conventions


@pytest.mark.slow  # fast tier: grain worker processes, started several times (63 s under load)
def test_two_workers_give_the_same_batches_and_resume():
    """Worker processes: same batches as in-process; a mid-epoch state resumes exactly."""
    # 86 records, batch 4: 21 training batches, so the two workers get 11 and 10.
    split = TinySplit(n=86)
    in_process = list(_loader(split, worker_count=0, batch_size=4))
    workers = iter(_loader(split, worker_count=2, batch_size=4))
    head = [next(workers) for _ in range(5)]
    state = workers.get_state()
    resumed = iter(_loader(split, worker_count=2, batch_size=4))
    resumed.set_state(state)
    _same(head + list(resumed), in_process)
    # Evaluation: 22 batches, the last one of 2 records, also unchanged by workers.
    evaluation = list(_loader(split, train=False, worker_count=2, batch_size=4))
    _same(evaluation, list(_loader(split, train=False, batch_size=4)))
    assert len(evaluation[-1]["label"]) == 2


def test_default_sharding_is_the_jax_process():
    loader = pipeline.make_loader(TinySplit(), batch_size=8, seed=0, epoch=0, train=True,
                                  image_size=16)
    assert len(list(loader)) == pipeline.steps_in_epoch(
        TinySplit(), 8, sampler="shuffle", train=True, shard_count=jax.process_count())


def test_every_row_keeps_its_records_label():
    """Shuffled, resampled (MRR), augmented or not, from a per-epoch or a run loader: each row's
    label is the label of the record its image came from."""
    labels = np.random.default_rng(1).integers(0, 3, 60)
    split = TinySplit(labels=labels)
    run_loader = _loader(split, epoch=None, epochs=(0, 2))
    for loader in (_loader(split), _loader(split, sampler="mrr", epoch=1),
                   _loader(split, train=False, shuffle_eval=True), run_loader):
        for batch in loader:
            np.testing.assert_array_equal(batch["label"], labels[_ids(batch).astype(int)])


def test_a_loader_over_epochs_serves_each_as_a_one_epoch_loader_and_resumes():
    """The loader training reads (one over all epochs, here without worker processes) gives epoch
    e's batches exactly as make_loader(epoch=e): order, MRR draw, augmentation; a state taken
    mid-run resumes there, and a loader starting at epoch 1 starts with epoch 1's batches.
    (With worker processes: tests/test_pipeline_workers.py, slow.)"""
    # 3 classes of 31/30/29 records: MRR draws 87 per epoch, a new draw each epoch; batch 4: 21 steps.
    split = TinySplit(n=90, labels=np.r_[np.zeros(31), np.ones(30), np.full(29, 2)])
    per_epoch = [list(_loader(split, sampler="mrr", batch_size=4, epoch=e)) for e in range(3)]
    assert all(len(batches) == 21 for batches in per_epoch)
    options = dict(batch_size=4, sampler="mrr", epoch=None)
    iterator = iter(_loader(split, epochs=(0, 3), **options))
    _same([next(iterator) for _ in range(21 + 5)], per_epoch[0] + per_epoch[1][:5])
    resumed = iter(_loader(split, epochs=(0, 3), **options))
    resumed.set_state(iterator.get_state())
    _same(list(resumed), per_epoch[1][5:] + per_epoch[2])
    _same(list(_loader(split, epochs=(1, 3), **options)), per_epoch[1] + per_epoch[2])
