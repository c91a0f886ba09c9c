"""What runs after each training step besides the step: actions `(step, state) -> None`, in the
style of clu's periodic actions (training/loop.py `train_epoch` runs them, in order)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from arm_jax.training.checkpoints import Checkpoints
    from arm_jax.training.feed import Timings, TrainBatches
    from arm_jax.training.state import TrainState

log = logging.getLogger(__name__)

# `step` counts the run's steps from 1 (epoch * steps_per_epoch + batch); `state` is the step's result.
Action = Callable[[int, "TrainState"], None]


class FirstStepReport:
    """Once, after a launch's first step: wait for it, log its time (from `batches.served_at`), and
    compile `snapshot` (the epoch-end copy of the state) with it rather than at the first epoch
    boundary, between two epochs' steps."""

    def __init__(self, snapshot: Callable, batches: TrainBatches):
        self.snapshot, self.batches, self.done = snapshot, batches, False

    def __call__(self, step: int, state: TrainState) -> None:
        if self.done:
            return
        jax.block_until_ready(state)
        self.done = True
        log.info("first step done in %.1f s (includes compilation)", time.perf_counter() - self.batches.served_at)
        jax.block_until_ready(self.snapshot(state))


class MidEpochCheckpoints:
    """`save(state, batches_done)` every `every` batches of an epoch but its last (the epoch end
    saves); before that, every step, the error of a background save that failed (a full disk)."""

    def __init__(self, ckpt: Checkpoints, every: int, steps_per_epoch: int, save: Callable[[TrainState, int], None]):
        self.ckpt, self.every, self.steps_per_epoch, self.save = ckpt, every, steps_per_epoch, save

    def __call__(self, step: int, state: TrainState) -> None:
        self.ckpt.raise_if_failed()  # an epoch-end save, written from a thread: stop now, not at the next save
        batch = step % self.steps_per_epoch  # 0: the epoch's last
        if self.every and batch and batch % self.every == 0:
            self.save(state, batch)


class StepTimes:
    """feed.Timings' 'batch' (the wait for the step's batch) and 'step' (the rest of its iteration)
    events of one epoch: the last action of a step."""

    def __init__(self, timings: Timings, batches: TrainBatches, epoch: int):
        self.timings, self.batches, self.epoch = timings, batches, epoch
        self.stepped = False

    def __call__(self, step: int, state: TrainState) -> None:
        self.timings.add("batch", self.epoch, self.batches.asked_at, self.batches.served_at)
        self.timings.add("step", self.epoch, self.batches.served_at)
        self.stepped = True

    @contextlib.contextmanager
    def last_fetch(self):
        """Time the epoch's last fetch of metrics as a 'step': its last step ends when they are back."""
        start = time.perf_counter()
        yield
        if self.stepped:
            self.timings.add("step", self.epoch, start)
