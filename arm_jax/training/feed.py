"""What feeds the training loop: training batches from loaders that live across epochs,
validation batches prefetched in a background thread, and an optional timing record."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

import jax

from arm_jax.data.pipeline import batch_positions, close_iterator
from arm_jax.errors import UserError

if TYPE_CHECKING:
    from arm_jax.training.checkpoints import Progress


class TrainBatches:
    """The training batches of one launch, epoch after epoch, with a position a checkpoint can hold.

    Batches come from one `make_loader` over [the launch's first epoch, config.epochs), so
    grain's worker processes start once per launch, not once per epoch. A checkpoint saves
    the grain state and that loader's epoch range: grain restores a state only into a loader
    whose sampler has the same repr, which names the range. When the loader is used up (the
    epochs were raised on resume), a new one serves the remaining epochs.
    """

    def __init__(self, split, config, *, batch_size: int, seed: int, steps_per_epoch: int):
        self._split, self._steps, self._last_epoch = split, steps_per_epoch, config.epochs
        self._workdir = config.workdir
        self._options = dict(batch_size=batch_size, seed=seed, train=True, sampler=config.sampler,
                             image_size=config.image_size, worker_count=config.worker_count,
                             shard_index=jax.process_index(), shard_count=jax.process_count())
        self._iterator = None
        self._range: tuple[int, int] = (0, 0)  # the open loader's epochs [first, last)
        self._served_until = (0, 0)  # (epoch, batch) of the iterator's next batch
        self.asked_at = self.served_at = 0.0  # perf_counter when `next` last began and returned

    def resume(self, progress: Progress, restore_data) -> None:
        """Open the loader a mid-epoch checkpoint was taken from and restore its state there
        (`restore_data(iterator)`: Checkpoints.restore_data)."""
        epoch, done = progress.epoch, progress.batches_done
        if not done:
            return  # an epoch start: `next` opens a loader
        self._open(progress.data_loader["first_epoch"], progress.data_loader["last_epoch"])
        try:
            restore_data(self._iterator)
        except ValueError as error:  # grain restores only with the worker count it saved with
            raise UserError(f"{self._workdir}: cannot resume mid-epoch {epoch + 1} with these data "
                            f"options ({error}); resume with the --workers of the interrupted run") from None
        self._served_until = (epoch, done)

    def next(self, epoch: int) -> dict:
        """The next training batch of `epoch` (each epoch's batches are asked for in order), with
        its records' places in the epoch ('epoch', 'position': what the device draws their
        augmentation from). A step begins when its batch is served (`served_at`:
        training/actions.py times steps so)."""
        self.asked_at = time.perf_counter()
        if not self._served_until[0] == epoch < self._range[1]:  # used up (or never opened)
            self._open(epoch, max(self._last_epoch, epoch + 1))
        at_epoch, at_batch = self._served_until
        batch = {**next(self._iterator), **batch_positions(
            at_epoch, at_batch, batch_size=self._options["batch_size"], shard_index=self._options["shard_index"],
            shard_count=self._options["shard_count"])}
        self._served_until = (at_epoch, at_batch + 1) if at_batch + 1 < self._steps else (at_epoch + 1, 0)
        self.served_at = time.perf_counter()
        return batch

    def position(self) -> tuple[dict, bytes]:
        """(the loader's epochs, as Progress.data_loader; its iterator's state): a mid-epoch
        checkpoint resumes right after the last batch served (see `resume`)."""
        first, last = self._range
        return {"first_epoch": first, "last_epoch": last}, self._iterator.get_state()

    def close(self) -> None:
        """Stop the loader's worker processes now rather than whenever it is collected."""
        close_iterator(self._iterator)
        self._iterator = None

    def _open(self, first_epoch: int, last_epoch: int) -> None:
        """The loader over epochs [first_epoch, last_epoch)."""
        from arm_jax.data.pipeline import make_loader

        self.close()
        self._iterator = iter(make_loader(self._split, epochs=(first_epoch, last_epoch), **self._options))
        self._range = (first_epoch, last_epoch)
        self._served_until = (first_epoch, 0)


class ValidationBatches:
    """The validation batches of every epoch of a launch, from one loader over all its passes (its
    worker processes start once per launch, not per epoch), read in a background thread from
    `prepare()` (a few training steps before the epoch ends) until `batches()` has served them,
    so the device does not wait for the first ones. Each pass is the same batches.
    """

    LEAD_STEPS = 3  # prepare this many training steps before the epoch ends

    def __init__(self, open_loader, *, records: int, batch_size: int):
        self._open_loader, self._records, self._batch_size = open_loader, int(records), int(batch_size)
        self._iterator, self._prefetch = None, None
        self._between_passes = True  # the iterator's next batch starts a pass

    def prepare(self) -> None:
        if self._prefetch is None:
            self._prefetch = Prefetch(self._one_pass)

    def batches(self):
        """This epoch's validation batches (prefetched if `prepare` was called)."""
        self.prepare()
        prefetch, self._prefetch = self._prefetch, None
        try:
            yield from prefetch
        finally:
            prefetch.close()
            if not self._between_passes:  # stopped mid-pass: the next pass needs a fresh loader
                self._close_iterator()

    def close(self) -> None:
        """Stop a prefetch that was prepared but not read (a stop near an epoch's end), and the
        loader's worker processes."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        self._close_iterator()

    def _one_pass(self):
        self._between_passes = False
        for start in range(0, self._records, self._batch_size):
            batch = self._next_batch(start)
            if len(batch["label"]) != min(self._batch_size, self._records - start):
                raise RuntimeError(f"validation batch at record {start}: {len(batch['label'])} records, "
                                   "not where a pass's batches put it")
            yield batch
        self._between_passes = True

    def _next_batch(self, start: int) -> dict:
        """The loader's next batch (record `start` of a pass)."""
        if self._iterator is None:
            self._reopen()
        try:
            return next(self._iterator)
        except StopIteration:  # its passes are used up (a pass read, then abandoned): a new loader
            if start:
                raise RuntimeError(f"the validation loader ended at record {start} of a pass") from None
        self._reopen()
        return next(self._iterator)

    def _reopen(self) -> None:
        self._close_iterator()
        self._iterator = iter(self._open_loader())

    def _close_iterator(self) -> None:
        close_iterator(self._iterator)
        self._iterator = None


class Prefetch:
    """Iterate `make_iterable()` in a background thread into a bounded queue."""

    _END = object()

    def __init__(self, make_iterable, size: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make_iterable,), daemon=True,
                                        name="arm-jax-prefetch")
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the thread (after the batch it is preparing) and drop what it queued."""
        self._closed.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _fill(self, make_iterable) -> None:
        iterator = None
        try:
            iterator = iter(make_iterable())
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as error:  # noqa: BLE001 -- raised again in the consuming thread
            self._put(_Failed(error))
        finally:
            close_iterator(iterator)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Timings:
    """Where the loop's wall time goes, for benchmarks (scripts/benchmark_loop.py): a list of
    (what, epoch, start, end) with perf_counter times. `what`: 'batch' (waiting for the next
    training batch), 'step' (the rest of a training iteration: transfer, dispatch, the previous
    step's metrics; the last one of an epoch waits for its own), 'validate' (all of
    validation), 'val_batch' (waiting for a validation batch), 'epoch_end' (after validation:
    metrics, checkpoint, log)."""

    def __init__(self):
        self.events: list[tuple[str, int, float, float]] = []

    def add(self, what: str, epoch: int, start: float, end: float | None = None) -> None:
        self.events.append((what, epoch, start, time.perf_counter() if end is None else end))

    def timed(self, iterable, what: str, epoch: int):
        """`iterable`'s items, recording each wait for one as `what`."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.add(what, epoch, start)
            yield item


class NoTimings(Timings):
    """A Timings that records nothing: the loop's default."""

    def add(self, what: str, epoch: int, start: float, end: float | None = None) -> None:
        pass

    def timed(self, iterable, what: str, epoch: int):
        return iterable
