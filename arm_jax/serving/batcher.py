"""Dynamic batching: faces from concurrent requests share one classifier call.

Request threads call `Batcher.probabilities(faces)` (the Classifier protocol of
arm_jax.inference.predict, so FacePipeline runs on it unchanged) and block; one
thread takes the first waiting job, gathers more for at most `max_wait_s` or
until `max_batch` faces, runs the classifier once and hands each job its rows.
Under load the next batch is already waiting when one ends, so the server runs
at the classifier's batched throughput. Every model here uses the running GAR,
so a face's answer does not depend on its batch.
"""

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future

import numpy as np

from arm_jax.inference.predict import Classifier

log = logging.getLogger(__name__)


class _Job:
    def __init__(self, faces: np.ndarray):
        self.faces, self.future = faces, Future()


_STOP = object()


class Batcher:
    """A thread that runs `classifier` on batches of up to `max_batch` faces gathered from its callers."""

    def __init__(self, classifier: Classifier, max_batch: int, max_wait_s: float):
        self.classifier, self.max_batch, self.max_wait_s = classifier, max_batch, max_wait_s
        self.class_names, self.image_size = classifier.class_names, classifier.image_size
        self._jobs: queue.Queue = queue.Queue()
        self._carried: _Job | None = None  # a job that did not fit the last batch: first in the next
        self._lock = threading.Lock()
        self._batch_sizes: Counter = Counter()  # faces per classifier call -> how many calls
        self._jobs_per_batch: Counter = Counter()  # callers served by one call -> how many calls
        self._thread = threading.Thread(target=self._run, name="arm-jax-batcher", daemon=True)
        self._thread.start()

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        """(N, classes) for uint8 (N, size, size, 3), computed in a batch with other callers' faces."""
        if not len(faces):
            return np.zeros((0, len(self.class_names)), np.float32)
        if not self._thread.is_alive():
            raise RuntimeError("the batcher has stopped")
        job = _Job(faces)
        self._jobs.put(job)
        return job.future.result()

    def close(self) -> None:
        """Answer the jobs already queued, then stop the thread."""
        self._jobs.put(_STOP)
        self._thread.join()

    def stats(self) -> dict:
        """How many classifier calls ran with each number of faces; how many batches served each number of callers."""
        with self._lock:
            return {"batches": sum(self._batch_sizes.values()),
                    "faces_per_batch": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                    "requests_per_batch": {str(k): v for k, v in sorted(self._jobs_per_batch.items())}}

    def _next_job(self, timeout: float | None):
        if self._carried is not None:
            job, self._carried = self._carried, None
            return job
        return self._jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self._jobs.get_nowait()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._next_job(None)
            if first is _STOP:
                break
            jobs, count = [first], len(first.faces)
            deadline = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                try:
                    job = self._next_job(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True  # answer what was gathered, then stop
                    break
                if count + len(job.faces) > self.max_batch:
                    self._carried = job
                    break
                jobs.append(job)
                count += len(job.faces)
            self._answer(jobs, count)
        while self._carried is not None or not self._jobs.empty():  # jobs queued behind the stop
            job = self._next_job(0)
            if job is not _STOP:
                self._answer([job], len(job.faces))

    def _answer(self, jobs: list[_Job], count: int) -> None:
        # Only a single photo with more faces than max_batch makes more than one slice.
        starts = range(0, count, self.max_batch)
        try:
            faces = np.concatenate([job.faces for job in jobs])
            rows = np.concatenate([self.classifier.probabilities(faces[start : start + self.max_batch])
                                   for start in starts])
        except Exception as error:  # the callers report it; the thread lives on for the next batch
            log.exception("the classifier failed on a batch of %d faces", count)
            for job in jobs:
                job.future.set_exception(error)
            return
        with self._lock:
            for start in starts:
                self._batch_sizes[min(self.max_batch, count - start)] += 1
            self._jobs_per_batch[len(jobs)] += 1
        start = 0
        for job in jobs:
            job.future.set_result(rows[start : start + len(job.faces)])
            start += len(job.faces)
