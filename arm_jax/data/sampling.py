"""Per-epoch index orders: a plain shuffle and minimal random resampling (MRR, paper 4.4).

Every order is a pure function of (epoch, seed): each epoch draws from its own
`np.random.Generator` seeded with `[seed, epoch]`, never from global RNG state.
"""

from collections.abc import Sequence

import numpy as np
from grain import RecordMetadata

from arm_jax.errors import UserError


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that owns one epoch's sampling decisions."""
    return np.random.default_rng([int(seed), int(epoch)])


def shuffle_epoch_indices(n: int, *, epoch: int, seed: int) -> np.ndarray:
    """A fresh permutation of range(n) for this epoch (int64)."""
    return _epoch_rng(seed, epoch).permutation(int(n))


def class_counts(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Examples per class id, length num_classes (default: max label + 1)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise UserError(f"labels must be >= 0, found {labels.min()}")
    minlength = 0 if num_classes is None else int(num_classes)
    return np.bincount(labels, minlength=minlength)


def mrr_epoch_size(labels: np.ndarray, class_names: Sequence[str] | None = None) -> int:
    """Records in one MRR epoch: num_classes * (smallest class size)."""
    counts = _checked_counts(labels, class_names)
    return int(counts.size * counts.min())


def mrr_epoch_indices(labels: np.ndarray, *, epoch: int, seed: int,
                      class_names: Sequence[str] | None = None) -> np.ndarray:
    """Minimal random resampling: every class gives min-count indices, drawn afresh each epoch.

    Inside each class the draw is without replacement, so an epoch has no repeats; the
    draw changes with the epoch, so over E epochs a class of n examples sampled m at a
    time is covered like 1 - (1 - m/n)**E (the paper: "even the largest category can
    basically be traversed"). The concatenated draws are then shuffled.

    Args:
      labels: int (N,) class id of every record in the split.
      epoch, seed: the draw is a pure function of these two.
      class_names: canonical class order; its length fixes the number of classes and
        its names appear in the error for a class with no examples.
    Returns:
      int64 (num_classes * min_count,) record indices in epoch order.
    """
    labels = np.asarray(labels)
    counts = _checked_counts(labels, class_names)
    per_class = int(counts.min())
    rng = _epoch_rng(seed, epoch)
    # A stable sort groups the records by class while keeping index order inside a class,
    # so the draw below depends only on (labels, seed, epoch).
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    drawn = [rng.choice(members, size=per_class, replace=False) for members in by_class]
    return rng.permutation(np.concatenate(drawn))


def _checked_counts(labels: np.ndarray, class_names: Sequence[str] | None) -> np.ndarray:
    """Per-class counts; a class without examples is the user's error (MRR would be empty)."""
    num_classes = None if class_names is None else len(class_names)
    counts = class_counts(labels, num_classes)
    if num_classes is not None and counts.size > num_classes:
        raise UserError(
            f"label {counts.size - 1} is out of range for {num_classes} classes "
            f"{tuple(class_names)}")
    if counts.size == 0:
        raise UserError("minimal random resampling (sampler='mrr') needs a non-empty split")
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        names = [class_names[i] if class_names is not None else str(i) for i in empty]
        raise UserError(
            "minimal random resampling (sampler='mrr') draws the smallest class size from "
            f"every class, but class {', '.join(repr(n) for n in names)} "
            f"(id {', '.join(str(i) for i in empty)}) has no examples in this split; "
            "use sampler='shuffle' or a split that contains every class")
    return counts


KINDS = ("shuffle", "mrr", "eval", "eval-shuffled")  # training samplers, then evaluation orders


def training_position(step, shard, row, *, batch_size: int, shard_count: int):
    """The position in its epoch's order of row `row` of shard `shard`'s part of the epoch's
    global batch `step` (int or numpy arrays): the shards take consecutive slices of each."""
    return (step * shard_count + shard) * batch_size + row


class EpochLabels:
    """What an epoch's order reads of a split (labels, class names, size, name), cheap to pickle into workers."""

    def __init__(self, split):
        self.labels = np.asarray(split.labels)
        self.class_names = tuple(split.class_names)
        self.name = str(getattr(split, "name", type(split).__name__))

    def __len__(self) -> int:
        return int(self.labels.size)


def epoch_records(labels: EpochLabels, kind: str) -> int:
    """Records in one epoch of `kind`, before sharding."""
    return mrr_epoch_size(labels.labels, labels.class_names) if kind == "mrr" else len(labels)


def epoch_order(labels: EpochLabels, *, kind: str, seed: int, epoch: int) -> np.ndarray:
    """The record indices of one epoch in order, before sharding and batching.

    Evaluation orders do not depend on the epoch: every pass reads the same batches (with the
    released code's batch GAR a prediction depends on its batch-mates).
    """
    if kind == "eval":
        return np.arange(len(labels))
    if kind == "eval-shuffled":
        return shuffle_epoch_indices(len(labels), epoch=0, seed=seed)
    if kind == "mrr":
        return mrr_epoch_indices(labels.labels, epoch=epoch, seed=seed, class_names=labels.class_names)
    return shuffle_epoch_indices(len(labels), epoch=epoch, seed=seed)


def steps_per_epoch(labels: EpochLabels, kind: str, *, batch_size: int, shard_count: int = 1) -> int:
    """Batches one shard yields per epoch: training, whole global batches of shard_count * batch_size
    (the remainder dropped); evaluation (one shard), every record, the last batch possibly short."""
    if kind.startswith("eval"):
        return -(-len(labels) // batch_size)
    return epoch_records(labels, kind) // (shard_count * batch_size)


class Sampler:
    """The grain sampler of every loader, one slot per batch: epochs [first_epoch, last_epoch) of one
    split in one stream, so a loader's worker processes start once, however many epochs it serves.

    Slot k is batch k // shard_count of the stream as shard k % shard_count reads it (grain gives
    slot p to shard p % shard_count); `records(k)` says which records it holds, and the loader's
    data source reads them. Training (`kind` 'shuffle' or 'mrr'): each epoch is its order cut into
    global batches of shard_count * batch_size records, shard s taking the s-th slice of each, so
    step j trains on the same records whichever number of processes shares it
    (`training_position`); the remainder is dropped. Evaluation ('eval', 'eval-shuffled'; one
    shard): every record of the same order each pass, the pass's last batch short. A batch is one
    grain element, read whole by one worker process: batches do not depend on the worker count.
    Picklable and cheap to copy into workers; its repr is stable (grain stores it in the iterator
    state and restores a state only into a sampler of the same repr).
    """

    def __init__(self, split, *, kind: str, seed: int, first_epoch: int, last_epoch: int, batch_size: int,
                 shard_count: int = 1):
        if kind not in KINDS:
            raise ValueError(f"sampler kind must be one of {KINDS}, got {kind!r}")
        if kind.startswith("eval") and shard_count != 1:
            raise ValueError("evaluation reads the whole split in every process: shard_count must be 1")
        self._labels, self._kind, self._seed = EpochLabels(split), kind, int(seed)
        self._first, self._last = int(first_epoch), int(last_epoch)
        self._b, self._shards = int(batch_size), int(shard_count)
        self._steps = steps_per_epoch(self._labels, kind, batch_size=self._b, shard_count=self._shards)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def train(self) -> bool:
        return not self._kind.startswith("eval")

    def __len__(self) -> int:
        return self._steps * (self._last - self._first) * self._shards

    def __repr__(self) -> str:
        return (f"Sampler(split={self._labels.name!r}, kind={self._kind!r}, records={len(self._labels)}, "
                f"seed={self._seed}, epochs=[{self._first}, {self._last}), batch_size={self._b}, "
                f"shard_count={self._shards})")

    def __getitem__(self, index: int) -> RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"sampler index {index} out of range [0, {len(self)})")
        return RecordMetadata(index=index, record_key=index, rng=None)

    def records(self, key: int) -> np.ndarray:
        """The record indices (int64, in batch order) of slot `key`'s batch."""
        shard, batch = key % self._shards, key // self._shards
        epoch, step = self._first + batch // self._steps, batch % self._steps
        order = self._order(epoch)
        if not self.train:
            return order[step * self._b:(step + 1) * self._b]
        return order[training_position(step, shard, np.arange(self._b), batch_size=self._b, shard_count=self._shards)]

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:  # workers move through epochs in order: keep a few
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self._labels, kind=self._kind, seed=self._seed, epoch=epoch)
        return self._orders[epoch]
