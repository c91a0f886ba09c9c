"""grain input pipeline for one epoch: sampler -> read split[i] -> augment -> batch.

Batches are dicts of numpy arrays, ready for a jitted step that calls
`transforms.device_preprocess`:
  'image': uint8 (B, H, W, C), native or staging size, C in {1, 3}, not normalised;
  'label': int32 (B,);
  'erase': int32 (B, 4) RandomErasing box (top, left, height, width) in image_size
           coordinates; all zeros = no erasing (always zeros in evaluation).
"""

import gc
import multiprocessing
import os
import threading
import time
from typing import Any

import absl.flags
import grain
import jax
import numpy as np

from arm_jax.compat import close_grain_iterator, shared_memory_delete_pool
from arm_jax.data import sampling, transforms
from arm_jax.data.base import resize_uint8
from arm_jax.errors import UserError

SAMPLERS = ("shuffle", "mrr")
RESIZE_ON = ("device", "host")
_PROBE_RECORDS = 4  # records decoded to guess whether a split has one image size


def make_loader(split, *, batch_size: int, seed: int, epoch: int, train: bool,
                sampler: str = "shuffle", image_size: int, worker_count: int = 0,
                shard_index: int | None = None, shard_count: int | None = None,
                resize_on: str = "device", staging_size: int | None = None,
                shuffle_eval: bool = False, worker_buffer_size: int = 2,
                read_threads: int = 0) -> grain.DataLoader:
    """A grain.DataLoader over ONE epoch of `split` (batches described in the module doc).

    Args:
      split: a LabelledSplit (random access, picklable; `labels`, `class_names`).
      batch_size: records per batch on this shard (process).
      seed, epoch: the order, the MRR draw and every augmentation are pure functions of
        these; the batches do not depend on worker_count.
      train: augment (flip/noise, erasing box) and drop the last partial batch; otherwise
        keep it, no augmentation, index order (or shuffled with `shuffle_eval`).
      sampler: 'shuffle' (every record once) or 'mrr' (minimal random resampling, paper
        4.4); training only: evaluation always reads the whole split.
      image_size: the model's input side; erasing boxes are drawn in these coordinates.
      worker_count: grain worker processes (0: read and augment in this process).
      shard_index, shard_count: this process's part of the epoch (default
        jax.process_index() / jax.process_count()); shards are disjoint.
      resize_on: 'device' ships native-size images (resized in device_preprocess);
        'host' resizes to image_size here.
      staging_size: host-side size for splits whose images differ in size; default: the
        split's own size when its probed records share one (and it is at most
        image_size), else image_size.
      shuffle_eval: shuffle evaluation batches with (seed, epoch) (the released 'batch'
        GAR mode computes its mean over whatever shares a test batch).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: grain read threads per process (0: read inline).
    """
    _check_options(batch_size=batch_size, sampler=sampler, image_size=image_size,
                   resize_on=resize_on, worker_count=worker_count)
    if len(split) == 0:
        raise UserError(f"{_name(split)}: the split has no records")
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= shard_index < shard_count:
        raise UserError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    if train and steps_in_epoch(split, batch_size, sampler=sampler, train=True,
                                shard_count=shard_count) == 0:
        raise UserError(
            f"{_name(split)}: one {sampler} epoch has {_epoch_records(split, sampler, True)} "
            f"records, fewer than batch_size {batch_size} x {shard_count} shard(s); "
            "lower the batch size")
    order = epoch_order(split, sampler=sampler, train=train, seed=seed, epoch=epoch,
                        shuffle_eval=shuffle_eval)
    epoch_sampler = sampling.EpochSampler(
        order, kind=sampler if train else ("eval-shuffled" if shuffle_eval else "eval"),
        seed=seed, epoch=epoch, batch_size=batch_size, shard_count=shard_count,
        worker_count=worker_count, drop_remainder=train)
    staging = _staging_shape(split, image_size, staging_size, resize_on)
    stage = StageImage(staging)
    operations = [DropPadding(),
                  TrainAugment(stage, image_size) if train else EvalRecord(stage),
                  grain.transforms.Batch(batch_size=batch_size, drop_remainder=train)]
    if worker_count > 0:
        # Worker processes read absl flags (grain issue 1355); nothing parses them here.
        absl.flags.FLAGS.mark_as_parsed()
    # grain's default 16 read threads with a 500-record buffer cost more than they save
    # here (its prefetch bookkeeping scans the whole buffer per record: 3x slower on FER);
    # parallelism comes from worker processes instead.
    read_options = grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=4 * read_threads)
    return grain.DataLoader(
        data_source=_PaddedSource(split), sampler=epoch_sampler, operations=operations,
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_options=read_options,
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=train))


def read_through(loader):
    """Every batch of `loader`, in order; its worker processes are shut down and their shared
    memory unlinked when the batches end or the reader stops early (see close_iterator)."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        close_iterator(iterator)


def close_iterator(iterator) -> None:
    """Shut a grain DataLoader iterator's worker processes down (grain has no public close), and
    unlink the shared memory of the batches it delivered that nothing uses any more."""
    if close_grain_iterator(iterator):
        release_worker_batches()


_UNLINK_WAIT_SECONDS = 10.0


def release_worker_batches() -> None:
    """Unlink now the shared memory of grain worker batches that are garbage, rather than at exit.

    When a worker's share of the loader ends, grain's prefetch thread (in this process) gets the
    worker's StopIteration, whose traceback keeps that thread's frame, and with it the worker's
    last batch, in a reference cycle with the frames that re-raise it: only the cyclic collector
    frees that batch. Left to the collection at interpreter exit, it comes after multiprocessing's
    exit handler has stopped the thread pool grain deletes batches with
    (`SharedMemoryArray.enable_async_del`): the segments are never unlinked, and the resource
    tracker warns of 'leaked shared_memory objects' (3 per worker and loader).

    So collect now, then wait for that pool to run the deletions queued so far. Its thread is held
    during the collection: the collector also finalizes each batch's SharedMemory object (its
    `__del__` closes it), and a close racing the pool's close + unlink of the same object can make
    the pool's call fail before the unlink (one leaked segment now and then). The pool is private
    (compat.shared_memory_delete_pool): absent, the collection alone is done; grain runs it with
    one thread, so tasks run in the order queued.
    """
    pool = shared_memory_delete_pool()
    gate = threading.Event()
    held = False
    if pool is not None:
        try:
            pool.apply_async(gate.wait, (_UNLINK_WAIT_SECONDS,))
            held = True
        except ValueError:  # the pool is closed
            pass
    try:
        gc.collect()
    finally:
        gate.set()
    if held:
        pool.apply_async(int).wait(_UNLINK_WAIT_SECONDS)  # bounded: a pool stopped at exit never answers


def steps_in_epoch(split, batch_size: int, *, sampler: str, train: bool,
                   shard_count: int = 1) -> int:
    """Batches one shard yields in one epoch.

    Training shards are equal (whole batches only). Evaluation splits the records as
    evenly as possible, so with several shards this is shard 0's count, the largest; the
    others may have one batch fewer.
    """
    records = _epoch_records(split, sampler, train)
    if train:
        return records // shard_count // batch_size
    largest_shard = -(-records // shard_count)  # ceil division
    return -(-largest_shard // batch_size)


def epoch_order(split, *, sampler: str, train: bool, seed: int, epoch: int,
                shuffle_eval: bool = False) -> np.ndarray:
    """The record indices of one epoch in order, before sharding and batching."""
    if not train:
        if shuffle_eval:
            return sampling.shuffle_epoch_indices(len(split), epoch=epoch, seed=seed)
        return np.arange(len(split))
    if sampler == "mrr":
        return sampling.mrr_epoch_indices(split.labels, epoch=epoch, seed=seed,
                                          class_names=split.class_names)
    return sampling.shuffle_epoch_indices(len(split), epoch=epoch, seed=seed)


class StageImage:
    """Bring a record's image to the staging (H, W, C) that every batch shares."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(int(s) for s in shape)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width, channels = self.shape
        image = np.asarray(image, dtype=np.uint8)
        image = image[:, :, None] if image.ndim == 2 else image
        # Resize as few planes as possible: RGB -> gray before, gray -> RGB after.
        if image.shape[-1] > channels:
            image = transforms.to_channels(image, channels)
        image = resize_uint8(image, height, width)
        return transforms.to_channels(image, channels)


class DropPadding(grain.transforms.Filter):
    """Drop the sampler's padding slots (see sampling.epoch_layout) before any work."""

    def filter(self, element: dict[str, Any]) -> bool:
        return "image" in element


class TrainAugment(grain.transforms.RandomMap):
    """Released train transform on the host: flip-or-noise, staging, erasing box."""

    def __init__(self, stage: StageImage, image_size: int):
        self.stage, self.image_size = stage, int(image_size)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        # The reference flips/noises the native image, then resizes: same order here.
        image = transforms.flip_or_noise(np.asarray(element["image"], np.uint8), rng)
        return {"image": self.stage(image), "label": np.int32(element["label"]),
                "erase": transforms.sample_erase_box(rng, self.image_size)}


class EvalRecord(grain.transforms.Map):
    """Evaluation record: staged image, label, no erasing."""

    def __init__(self, stage: StageImage):
        self.stage = stage

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return {"image": self.stage(element["image"]), "label": np.int32(element["label"]),
                "erase": transforms.NO_ERASE.copy()}


PAD_LABEL = -1  # the label of EvalRecordOrPad's blank records


class EvalRecordOrPad(EvalRecord):
    """EvalRecord, and for the sampler's padding a blank record of label -1 that keeps batches
    aligned with passes (`make_eval_run_loader`; the reader cuts it off)."""

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if "image" in element:
            return super().map(element)
        return {"image": np.zeros(self.stage.shape, np.uint8), "label": np.int32(PAD_LABEL),
                "erase": transforms.NO_ERASE.copy()}


class _PaddedSource:
    """The split plus one padding record; a repr grain can compare across processes.

    grain reads `source[key % len(source)]`, so the sampler's PAD (-1) lands on the extra
    last key, which returns a marker without decoding anything.
    """

    def __init__(self, split):
        self._split = split

    def __len__(self) -> int:
        return len(self._split) + 1

    def __getitem__(self, key: int) -> dict[str, Any]:
        if key == len(self._split):
            return {"padding": np.bool_(True)}
        return self._split[key]

    def __repr__(self) -> str:
        # grain refuses to restore a state whose source repr differs: the default repr
        # carries a memory address, so name the split by its name and size instead.
        return f"PaddedSource(name={_name(self._split)!r}, num_records={len(self._split)})"

    def __setstate__(self, state: dict) -> None:
        # Unpickled in each grain worker process, as it starts.
        self.__dict__.update(state)
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid is not None:
            _exit_with_parent(parent.pid)


_PARENT_POLL_SECONDS = 1.0
_watching_parent = False


def _exit_with_parent(parent: int) -> None:
    """End this worker process when the process that started it (pid `parent`) is gone.

    grain stops its workers when the loader is closed or the program exits, but a training
    process killed by SIGKILL (or the OOM killer) cannot: its workers lived on, idle, ~220 MB
    each. Polling the parent's pid is used rather than prctl(PR_SET_PDEATHSIG), which fires
    when the spawning *thread* ends (validation loaders start in a prefetch thread).
    """
    global _watching_parent
    if _watching_parent:
        return
    _watching_parent = True
    # `parent` is the pid recorded at spawn time: a worker still starting up when its parent
    # died has been re-parented already, and must see that at its first look.

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="arm-jax-parent-watch").start()


def _staging_shape(split, image_size: int, staging_size: int | None,
                   resize_on: str) -> tuple[int, int, int]:
    """(H, W, C) that all images of a batch share; see make_loader's staging_size."""
    probe = [np.asarray(split[int(i)]["image"]) for i in
             np.unique(np.linspace(0, len(split) - 1, _PROBE_RECORDS).astype(int))]
    probe = [p[:, :, None] if p.ndim == 2 else p for p in probe]
    channels = 3 if any(p.shape[-1] == 3 for p in probe) else 1
    if resize_on == "host":
        return image_size, image_size, channels
    if staging_size is not None:
        return int(staging_size), int(staging_size), channels
    sizes = {p.shape[:2] for p in probe}
    height, width = sizes.pop() if len(sizes) == 1 else (image_size, image_size)
    if height * width > image_size * image_size:
        height = width = image_size  # never ship more pixels than the model reads
    return height, width, channels


def _epoch_records(split, sampler: str, train: bool) -> int:
    """Records in one epoch before sharding."""
    if train and sampler == "mrr":
        return sampling.mrr_epoch_size(split.labels, split.class_names)
    return len(split)


def _check_options(*, batch_size, sampler, image_size, resize_on, worker_count):
    """Reject option values that would fail deep inside grain."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if resize_on not in RESIZE_ON:
        raise UserError(f"resize_on must be one of {RESIZE_ON}, got {resize_on!r}")
    for option, value in (("batch_size", batch_size), ("image_size", image_size)):
        if int(value) <= 0:
            raise UserError(f"{option} must be positive, got {value}")
    if int(worker_count) < 0:
        raise UserError(f"worker_count must be >= 0, got {worker_count}")


def _name(split) -> str:
    return str(getattr(split, "name", type(split).__name__))


class _Labels:
    """What `epoch_order` reads of a split (labels, class names, size), cheap to pickle into workers."""

    def __init__(self, split):
        self.labels = np.asarray(split.labels)
        self.class_names = tuple(split.class_names)
        self.name = _name(split)

    def __len__(self) -> int:
        return int(self.labels.size)


def _batch_of_slot(slot: int, *, workers: int, batch_size: int) -> tuple[int, int]:
    """(global batch, row in it) of a run sampler's slot: worker w's k-th record is row k % b of
    its batch k // b, the run's batch (k // b) * workers + w, so grain's round-robin over workers
    yields the batches in order."""
    worker, k = slot % workers, slot // workers
    round_, offset = divmod(k, batch_size)
    return round_ * workers + worker, offset


class RunSampler:
    """grain sampler over training epochs [first_epoch, last_epoch) in one stream, so workers start once.

    Global batch g of the run (epoch first_epoch + g // steps, batch g % steps) goes to worker
    g % workers, so grain's round-robin over workers yields the run's batches in order for any
    worker count; each epoch's records, order, MRR draw and per-record generators are those
    of `make_loader(epoch=e)` (slot arithmetic of `sampling.epoch_layout`, train case).
    """

    def __init__(self, split, *, sampler: str, seed: int, first_epoch: int, last_epoch: int,
                 batch_size: int, shard_count: int, worker_count: int):
        self._labels, self._sampler, self._seed = _Labels(split), sampler, int(seed)
        self._first, self._last = int(first_epoch), int(last_epoch)
        self._b, self._shards, self._workers = int(batch_size), int(shard_count), max(int(worker_count), 1)
        self._steps = _epoch_records(split, sampler, True) // (self._shards * self._b)
        self._batches = self._steps * (self._last - self._first)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        rounds = -(-self._batches // self._workers)
        return rounds * self._b * self._workers * self._shards

    def __repr__(self) -> str:
        return (f"RunSampler(split={self._labels.name!r}, sampler={self._sampler!r}, seed={self._seed}, "
                f"epochs=[{self._first}, {self._last}), batch_size={self._b}, "
                f"shard_count={self._shards}, worker_count={self._workers})")

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        shard, slot = index % self._shards, index // self._shards
        batch, offset = _batch_of_slot(slot, workers=self._workers, batch_size=self._b)
        if batch >= self._batches:
            return grain.RecordMetadata(index=index, record_key=sampling.PAD, rng=None)
        epoch, step = self._first + batch // self._steps, batch % self._steps
        position = step * self._shards * self._b + shard * self._b + offset
        return grain.RecordMetadata(index=index, record_key=int(self._order(epoch)[position]),
                                    rng=sampling.record_rng(self._seed, epoch, position))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:  # workers move through epochs in order: keep a few
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self._labels, sampler=self._sampler, train=True,
                                              seed=self._seed, epoch=epoch)
        return self._orders[epoch]


def make_run_loader(split, *, batch_size: int, seed: int, first_epoch: int, last_epoch: int,
                    sampler: str = "shuffle", image_size: int, worker_count: int = 0,
                    shard_index: int | None = None, shard_count: int | None = None,
                    resize_on: str = "device", staging_size: int | None = None,
                    worker_buffer_size: int = 2, read_threads: int = 0) -> grain.DataLoader:
    """Training batches of epochs [first_epoch, last_epoch) from ONE DataLoader (workers start once).

    Yields steps_in_epoch(...) batches per epoch, in order, each equal to what
    `make_loader(epoch=e, train=True)` yields; options as in `make_loader`.
    """
    _check_options(batch_size=batch_size, sampler=sampler, image_size=image_size,
                   resize_on=resize_on, worker_count=worker_count)
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if steps_in_epoch(split, batch_size, sampler=sampler, train=True, shard_count=shard_count) == 0:
        raise UserError(f"{_name(split)}: one {sampler} epoch has fewer records than batch_size "
                        f"{batch_size} x {shard_count} shard(s); lower the batch size")
    run_sampler = RunSampler(split, sampler=sampler, seed=seed, first_epoch=first_epoch,
                             last_epoch=last_epoch, batch_size=batch_size, shard_count=shard_count,
                             worker_count=worker_count)
    stage = StageImage(_staging_shape(split, image_size, staging_size, resize_on))
    operations = [DropPadding(), TrainAugment(stage, image_size),
                  grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)]
    return _run_data_loader(split, run_sampler, operations, shard_index=shard_index, shard_count=shard_count,
                            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                            read_threads=read_threads)


def _run_data_loader(split, sampler, operations, *, shard_index: int, shard_count: int, worker_count: int,
                     worker_buffer_size: int, read_threads: int) -> grain.DataLoader:
    """The DataLoader of a run-long loader (whole batches only: the samplers pad)."""
    if worker_count > 0:
        absl.flags.FLAGS.mark_as_parsed()  # as in make_loader
    return grain.DataLoader(
        data_source=_PaddedSource(split), sampler=sampler, operations=operations,
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads),
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True))


class EvalRunSampler:
    """grain sampler over `passes` evaluation passes of one split in one stream, so workers start once.

    A pass is ceil(N / batch_size) batches of the epoch order, the last one padded (PAD) to
    full size. Global batch g goes to worker g % workers, as in RunSampler, so grain's
    round-robin yields the passes' batches in order for any worker count.
    """

    def __init__(self, order: np.ndarray, *, name: str, passes: int, batch_size: int, worker_count: int):
        self._order, self._name = np.asarray(order), name
        self._passes, self._b, self._workers = int(passes), int(batch_size), max(int(worker_count), 1)
        self._batches_per_pass = -(-len(self._order) // self._b)
        self._batches = self._batches_per_pass * self._passes

    def __len__(self) -> int:
        return -(-self._batches // self._workers) * self._workers * self._b

    def __repr__(self) -> str:
        return (f"EvalRunSampler(split={self._name!r}, records={len(self._order)}, passes={self._passes}, "
                f"batch_size={self._b}, worker_count={self._workers})")

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        batch, offset = _batch_of_slot(index, workers=self._workers, batch_size=self._b)
        position = (batch % self._batches_per_pass) * self._b + offset
        if batch >= self._batches or position >= len(self._order):
            return grain.RecordMetadata(index=index, record_key=sampling.PAD, rng=None)
        return grain.RecordMetadata(index=index, record_key=int(self._order[position]), rng=None)


def make_eval_run_loader(split, *, passes: int, batch_size: int, seed: int, image_size: int,
                         shuffle_eval: bool = False, worker_count: int = 0,
                         resize_on: str = "device", staging_size: int | None = None,
                         worker_buffer_size: int = 2, read_threads: int = 0) -> grain.DataLoader:
    """`passes` evaluation passes over `split` from ONE DataLoader (workers start once).

    Each pass is the batches `make_loader(train=False, epoch=0)` yields, in order, except that
    its last batch is padded to batch_size with records of label PAD_LABEL at the end; the
    reader cuts them off (training.feed.ValidationBatches). Every process reads the whole split.
    """
    _check_options(batch_size=batch_size, sampler="shuffle", image_size=image_size,
                   resize_on=resize_on, worker_count=worker_count)
    if len(split) == 0:
        raise UserError(f"{_name(split)}: the split has no records")
    order = epoch_order(split, sampler="shuffle", train=False, seed=seed, epoch=0, shuffle_eval=shuffle_eval)
    run_sampler = EvalRunSampler(order, name=_name(split), passes=passes, batch_size=batch_size,
                                 worker_count=worker_count)
    stage = StageImage(_staging_shape(split, image_size, staging_size, resize_on))
    operations = [EvalRecordOrPad(stage), grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)]
    return _run_data_loader(split, run_sampler, operations, shard_index=0, shard_count=1,
                            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                            read_threads=read_threads)
