"""The grain input pipeline: sampler (a slot per batch) -> read and stage the batch's records -> hand
over, over one or many epochs.

One builder (`make_loader`) and one sampler (`sampling.Sampler`) serve training (an epoch,
or a run's epochs from one loader whose workers start once), evaluation and validation
(passes over the split). Batches are dicts of numpy arrays, ready for a jitted step that
calls `arm_jax.forward.apply_to_images`:
  'image': uint8 (B, H, W, C), native or staging size, C in {1, 3}, not augmented, not normalised;
  'label': int32 (B,).
Training batches are whole; an evaluation pass's last batch may be short. The host only reads
and stages images: training's augmentation is drawn on the device, per record, from the
record's place in the epoch (`batch_positions`, which the training loop adds to each batch).
"""

import gc
import multiprocessing
import os
import threading
import time

import absl.flags
import grain
import jax
from grain.multiprocessing import SharedMemoryArray
import numpy as np

from arm_jax.compat import close_grain_iterator, shared_memory_delete_pool
from arm_jax.data import sampling, transforms
from arm_jax.data.base import LabelledSplit, resize_uint8
from arm_jax.errors import UserError

SAMPLERS = ("shuffle", "mrr")
_PROBE_RECORDS = 4  # records decoded to guess whether a split has one image size


def make_loader(split, *, batch_size: int, seed: int, train: bool, image_size: int,
                epoch: int | None = None, epochs: tuple[int, int] | None = None,
                sampler: str = "shuffle", worker_count: int = 0,
                shard_index: int | None = None, shard_count: int | None = None,
                staging_size: int | None = None,
                shuffle_eval: bool = False, worker_buffer_size: int = 2,
                read_threads: int = 0) -> grain.DataLoader:
    """A grain.DataLoader over `epoch`, or epochs [first, last) = `epochs`, of `split` (batches
    described in the module doc), in order, from one set of worker processes.

    Args:
      split: a LabelledSplit (random access, picklable; `labels`, `class_names`).
      batch_size: records per batch on this shard (process).
      seed, epoch(s): the order and the MRR draw are pure functions of these; the batches do
        not depend on worker_count.
      train: training epochs, each epoch's last partial batch dropped; otherwise evaluation
        passes: index order (or shuffled with `shuffle_eval`), every record, the same batches
        each pass, one shard.
      sampler: 'shuffle' (every record once) or 'mrr' (minimal random resampling, paper
        4.4); training only: evaluation always reads the whole split.
      image_size: the model's input side (the staging size of splits whose images differ).
      worker_count: grain worker processes (0: read in this process); each reads whole batches.
      shard_index, shard_count: this process's part of each training epoch (default
        jax.process_index() / jax.process_count()); shards are disjoint.
      staging_size: host-side size for splits whose images differ in size; default: the
        split's own size when its probed records share one (and it is at most
        image_size), else image_size. Native-size images are resized by the forward pass.
      shuffle_eval: shuffle evaluation batches with `seed` (the released 'batch' GAR mode
        computes its mean over whatever shares a test batch).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: grain read threads per process (0: read inline).
    """
    if (epoch is None) == (epochs is None):
        raise ValueError("give one of epoch (one epoch) and epochs (a [first, last) range)")
    first_epoch, last_epoch = (int(epoch), int(epoch) + 1) if epochs is None else map(int, epochs)
    _check_options(batch_size=batch_size, sampler=sampler, image_size=image_size,
                   worker_count=worker_count)
    if len(split) == 0:
        raise UserError(f"{_name(split)}: the split has no records")
    if not train:  # every process reads the whole evaluation split (the sampler refuses shards)
        shard_index, shard_count = (0 if shard_index is None else shard_index), (shard_count or 1)
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= shard_index < shard_count:
        raise UserError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    if train and steps_in_epoch(split, batch_size, sampler=sampler, train=True, shard_count=shard_count) == 0:
        raise UserError(
            f"{_name(split)}: one {sampler} epoch has {_epoch_records(split, sampler, True)} "
            f"records, fewer than batch_size {batch_size} x {shard_count} shard(s); "
            "lower the batch size")
    kind = sampler if train else ("eval-shuffled" if shuffle_eval else "eval")
    run_sampler = sampling.Sampler(split, kind=kind, seed=seed, first_epoch=first_epoch, last_epoch=last_epoch,
                                   batch_size=batch_size, shard_count=shard_count)
    source = _BatchSource(split, run_sampler, StageImage(_staging_shape(split, image_size, staging_size)))
    # A grain element is a whole batch (read by one worker), so grain's per-element work is paid
    # once per batch, not per image; its batching step only hands the batch over (in shared
    # memory from a worker process).
    operations = [grain.transforms.Batch(batch_size=1, drop_remainder=False, batch_fn=_HandOver())]
    if worker_count > 0:
        # Worker processes read absl flags (grain issue 1355); nothing parses them here.
        absl.flags.FLAGS.mark_as_parsed()
    # grain's default 16 read threads with a 500-record buffer cost more than they save
    # here (its prefetch bookkeeping scans the whole buffer per record: 3x slower on FER);
    # parallelism comes from worker processes instead.
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)
    return grain.DataLoader(
        data_source=source, sampler=run_sampler, operations=operations,
        worker_count=worker_count, worker_buffer_size=worker_buffer_size, read_options=read_options,
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True))


def batch_positions(epoch: int, step: int, *, batch_size: int, shard_index: int, shard_count: int) -> dict:
    """Where the records of training batch `step` of `epoch` (this shard's part) sit in the epoch's
    order: {'epoch', 'position'}, int32 (B,) each, what the device draws their augmentation from
    (`transforms.augmentation_keys`). Training batches are whole and served in order, so this is
    known without asking the workers."""
    rows = np.arange(batch_size)
    position = sampling.training_position(step, shard_index, rows, batch_size=batch_size, shard_count=shard_count)
    return {"epoch": np.full(batch_size, epoch, np.int32), "position": position.astype(np.int32)}


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


def steps_in_epoch(split, batch_size: int, *, sampler: str, train: bool, shard_count: int = 1) -> int:
    """Batches one shard yields in one epoch (training: whole batches; evaluation: one shard, all records)."""
    kind = sampler if train else "eval"
    return sampling.steps_per_epoch(sampling.EpochLabels(split), kind, batch_size=batch_size,
                                    shard_count=shard_count if train else 1)


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


class _BatchSource:
    """The loader's data source: element k is the batch of sampler slot k, read whole and staged.

    Splits that can read many records at once (`LabelledSplit.read_images`: one gather from an
    in-memory or memory-mapped pixel array, one tfds call for prepared records) do; others are
    read record by record (`split[i]`).
    Its repr is one grain can compare across processes.
    """

    def __init__(self, split, sampler: sampling.Sampler, stage: StageImage):
        self._split, self._sampler, self._stage = split, sampler, stage

    def __len__(self) -> int:
        return len(self._sampler)

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        records = self._sampler.records(int(key))
        if isinstance(self._split, LabelledSplit):
            images, labels = self._split.read_images(records), self._split.labels[records]
        else:
            rows = [self._split[int(i)] for i in records]
            images, labels = [row["image"] for row in rows], np.array([row["label"] for row in rows])
        if not (isinstance(images, np.ndarray) and images.shape[1:] == self._stage.shape):
            images = [self._stage(image) for image in images]  # stacked by _HandOver
        return {"image": images, "label": np.asarray(labels, np.int32)}

    def __repr__(self) -> str:
        # grain refuses to restore a state whose source repr differs: the default repr
        # carries a memory address, so name the split by its name and size instead.
        return f"BatchSource(name={_name(self._split)!r}, num_records={len(self._split)})"

    def __setstate__(self, state: dict) -> None:
        # Unpickled in each grain worker process, as it starts.
        self.__dict__.update(state)
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid is not None:
            _exit_with_parent(parent.pid)


class _HandOver:
    """grain's batching function for elements that are batches already: each of the element's
    arrays (or lists of rows) as one array, in a worker process (grain calls
    `enable_shared_memory_output`) written straight into shared memory, so that the training
    process maps it rather than unpickling it."""

    def __init__(self):
        self._shared = False

    def enable_shared_memory_output(self) -> None:
        self._shared = True

    def __call__(self, values):
        (batch,) = values
        return {key: self._stacked(value) for key, value in batch.items()}

    def _stacked(self, rows) -> np.ndarray:
        """`rows` (an array, or a list of equal-shaped arrays) as one uint8/int32 array, written once:
        straight into shared memory in a worker process."""
        if not self._shared:
            return rows if isinstance(rows, np.ndarray) else np.stack(rows)
        first = np.asarray(rows[0])
        shared = SharedMemoryArray((len(rows), *first.shape), first.dtype)
        if isinstance(rows, np.ndarray):
            np.copyto(shared, rows, casting="no")
        else:
            np.stack(rows, out=shared)
        return shared


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


def _staging_shape(split, image_size: int, staging_size: int | None) -> tuple[int, int, int]:
    """(H, W, C) that all images of a batch share; see make_loader's staging_size."""
    probe = [np.asarray(split[int(i)]["image"]) for i in
             np.unique(np.linspace(0, len(split) - 1, _PROBE_RECORDS).astype(int))]
    probe = [p[:, :, None] if p.ndim == 2 else p for p in probe]
    channels = 3 if any(p.shape[-1] == 3 for p in probe) else 1
    if staging_size is not None:
        return int(staging_size), int(staging_size), channels
    sizes = {p.shape[:2] for p in probe}
    height, width = sizes.pop() if len(sizes) == 1 else (image_size, image_size)
    if height * width > image_size * image_size:
        height = width = image_size  # never ship more pixels than the model reads
    return height, width, channels


def _epoch_records(split, sampler: str, train: bool) -> int:
    """Records in one epoch before sharding."""
    return sampling.epoch_records(sampling.EpochLabels(split), sampler if train else "eval")


def _check_options(*, batch_size, sampler, image_size, worker_count):
    """Reject option values that would fail deep inside grain."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    for option, value in (("batch_size", batch_size), ("image_size", image_size)):
        if int(value) <= 0:
            raise UserError(f"{option} must be positive, got {value}")
    if int(worker_count) < 0:
        raise UserError(f"worker_count must be >= 0, got {worker_count}")


def _name(split) -> str:
    return str(getattr(split, "name", type(split).__name__))
