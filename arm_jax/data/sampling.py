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


# Record key of a padding slot in a sampler layout; the pipeline drops these right after
# reading, before augmentation and batching (see `epoch_layout`).
PAD = -1
# Separates the per-record augmentation streams from the epoch's sampling stream.
_RECORD_STREAM = 1


def record_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of the record at `position` in the epoch order."""
    return np.random.default_rng([int(seed), int(epoch), _RECORD_STREAM, int(position)])


def epoch_layout(num_records: int, *, batch_size: int, shard_count: int, worker_count: int,
                 drop_remainder: bool) -> np.ndarray:
    """Epoch position of every sampler slot (PAD for padding) so batches ignore worker_count.

    grain's DataLoader gives sampler slot p to shard p % shard_count; within a shard its
    q-th slot goes to worker q % workers, and each worker batches its own records. A plain
    index order would therefore put different records together (and drop a different
    remainder) for every worker count. Here each shard's part of the epoch is cut into
    batches first, batch j goes to worker j % workers, and every worker's stream is padded
    to the same number of batches; after dropping the padding, the main process's
    round-robin over workers yields batch 0, 1, 2, ... exactly as with no workers.

    Shards: train (drop_remainder) cuts the epoch into global batches of shard_count * b
    records and gives shard s the s-th slice of each, so step j trains on the same records
    whichever number of processes shares it (multi-process training equals one process),
    all processes run the same number of steps, and only whole global batches are used;
    eval splits the records as evenly as possible (np.array_split) and keeps a last,
    smaller batch.
    """
    b, s_count, w_count = int(batch_size), int(shard_count), max(int(worker_count), 1)
    if drop_remainder:
        steps = num_records // (s_count * b)
        shards = [(np.arange(steps)[:, None] * (s_count * b) + s * b + np.arange(b)).reshape(-1)
                  for s in range(s_count)]
    else:
        shards = np.array_split(np.arange(num_records), s_count)
    batches = [-(-len(part) // b) for part in shards]
    rounds = -(-max(batches) // w_count)
    layout = np.full((w_count * rounds * b, s_count), PAD, dtype=np.int64)
    for s, part in enumerate(shards):
        streams = np.full((w_count, rounds * b), PAD, dtype=np.int64)
        for j in range(batches[s]):
            chunk = part[j * b:(j + 1) * b]
            start = (j // w_count) * b
            streams[j % w_count, start:start + len(chunk)] = chunk
        # Worker w reads the shard's slots w, w + W, w + 2W, ...: slot k * W + w.
        layout[:, s] = streams.T.reshape(-1)
    return layout.reshape(-1)  # global slot p = q * shard_count + s


class EpochSampler:
    """grain sampler for one epoch: the epoch's order laid out by `epoch_layout`.

    Picklable and cheap to copy into workers; its repr is stable (grain stores it in the
    iterator state and refuses a state whose sampler repr differs). Each record carries
    `record_rng(seed, epoch, position)`, so augmentations depend on neither the worker
    count nor the sharding.
    """

    def __init__(self, order: np.ndarray, *, kind: str, seed: int, epoch: int, batch_size: int,
                 shard_count: int = 1, worker_count: int = 0, drop_remainder: bool = True):
        self._order = np.asarray(order, dtype=np.int64)
        self._kind, self._seed, self._epoch = kind, int(seed), int(epoch)
        self._batch_size, self._shard_count = int(batch_size), int(shard_count)
        self._worker_count, self._drop_remainder = int(worker_count), bool(drop_remainder)
        self._positions = epoch_layout(
            self._order.size, batch_size=batch_size, shard_count=shard_count,
            worker_count=worker_count, drop_remainder=drop_remainder)

    def __len__(self) -> int:
        return int(self._positions.size)

    def __repr__(self) -> str:
        return (f"EpochSampler(kind={self._kind!r}, epoch_records={self._order.size}, "
                f"seed={self._seed}, epoch={self._epoch}, batch_size={self._batch_size}, "
                f"shard_count={self._shard_count}, worker_count={self._worker_count}, "
                f"drop_remainder={self._drop_remainder})")

    def __getitem__(self, index: int) -> RecordMetadata:
        if not 0 <= index < self._positions.size:
            raise IndexError(f"sampler index {index} out of range [0, {self._positions.size})")
        position = int(self._positions[index])
        if position == PAD:
            return RecordMetadata(index=index, record_key=PAD, rng=None)
        return RecordMetadata(index=index, record_key=int(self._order[position]),
                              rng=record_rng(self._seed, self._epoch, position))

    def shard_record_keys(self, shard_index: int) -> np.ndarray:
        """Record indices shard `shard_index` reads this epoch, padding removed (for checks)."""
        positions = self._positions[shard_index::self._shard_count]
        return self._order[positions[positions != PAD]]
