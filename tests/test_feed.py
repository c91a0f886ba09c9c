"""What feeds the training loop (arm_jax/training/feed.py): validation batches prefetched in a
thread are the loader's own batches; errors reach the consumer; a stopped prefetch ends; a closed
loader leaves no shared memory behind. (TrainBatches across epochs and resumes:
tests/test_train.py, through train().)"""

import gc
import os
import threading
import time

import pytest

from arm_jax.data.pipeline import make_loader
from arm_jax.training.feed import Prefetch, ValidationBatches
from tests.test_pipeline import TinySplit, _loader, _same


def _validation(split, passes: int, batch_size: int = 8, worker_count: int = 0) -> ValidationBatches:
    return ValidationBatches(lambda: make_loader(split, epochs=(0, passes), train=False, batch_size=batch_size, seed=4,
                                                 image_size=16, shuffle_eval=True, worker_count=worker_count),
                             records=len(split), batch_size=batch_size)


def test_prefetched_validation_batches_equal_the_loader_read_afterwards():
    split = TinySplit(n=45)  # 45 / 8: five full batches and a partial one
    expected = list(_loader(split, train=False, shuffle_eval=True, seed=4))
    validation = _validation(split, passes=3)
    for epoch in range(2):  # prepared early, then read; the next epoch prefetches afresh
        validation.prepare()
        time.sleep(0.2)
        _same(list(validation.batches()), expected)
    _same(list(validation.batches()), expected)  # without prepare(): read on demand
    validation.close()


def test_a_validation_pass_stopped_midway_leaves_the_next_pass_whole():
    split = TinySplit(n=45)
    expected = list(_loader(split, train=False, shuffle_eval=True, seed=4))
    validation = _validation(split, passes=2)
    partial = validation.batches()
    _same([next(partial), next(partial)], expected[:2])
    partial.close()  # e.g. a failed evaluation step: the loader stands mid-pass
    _same(list(validation.batches()), expected)
    _same(list(validation.batches()), expected)  # a fresh loader: its passes start over
    validation.close()


def test_an_error_in_the_prefetch_thread_is_raised_to_the_reader():
    def failing():
        yield 1
        raise ValueError("record 7 is corrupt")

    prefetch = Prefetch(failing)
    items = iter(prefetch)
    assert next(items) == 1
    with pytest.raises(ValueError, match="record 7 is corrupt"):
        next(items)


def test_closing_a_full_prefetch_ends_its_thread():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    prefetch = Prefetch(endless, size=2)
    time.sleep(0.2)
    assert 2 <= len(produced) <= 4  # bounded: the queue holds 2, the thread waits with one more
    prefetch.close()
    assert not any(t.name == "arm-jax-prefetch" and t.is_alive() for t in threading.enumerate())


def _segment_names(batch: dict) -> set[str]:
    """The shared memory segments a grain worker batch's arrays came in."""
    return {value.shm.name for value in batch.values() if getattr(value, "shm", None)}


def _segments_left(names: set[str]) -> list[str]:
    """Those of `names` still in /dev/shm, not unlinked."""
    return sorted(name for name in names if os.path.exists(os.path.join("/dev/shm", name.lstrip("/"))))


def test_a_closed_worker_loader_leaves_none_of_its_batches_in_shared_memory():
    """Read to its end with 2 workers and closed, the loader has unlinked every segment its batches
    came in. Each worker's last batch stays in a reference cycle in grain's prefetch thread (the
    traceback of the worker's StopIteration) that only the cyclic collector frees; at exit that comes
    after grain's deletion pool has stopped, and the resource tracker reports leaked shared_memory."""
    split = TinySplit(n=48)  # 6 batches of 8 per pass, 3 per worker
    validation = _validation(split, passes=2, worker_count=2)
    names = set()
    gc.disable()  # so that the collector, run at any allocation, cannot free the cycle first
    try:
        for _ in range(2):
            for batch in validation.batches():
                names.update(_segment_names(batch))
        del batch
        validation.close()
    finally:
        gc.enable()
    assert len(names) == 2 * 6 * 2  # image and label of every batch came in shared memory
    assert _segments_left(names) == []
