"""Checkpoints with orbax: `<workdir>/checkpoints/<step>`, one manager keeping the last few and the best.

orbax's preservation policies decide what stays: the newest `keep` steps (LatestN) and the
step of the best validation WA (BestN over the 'metrics' item, whose WA only an epoch end that
set a new best carries: the first epoch to reach a WA stays the best). Each checkpoint (a
step directory) holds these items:
- 'variables': {'params', 'batch_stats', 'gar'}: all evaluate/predict need;
- 'optimizer': {'opt_state', 'step'}: Adam's moments and the step count;
- 'progress' (JSON): a `Progress` (epoch, batches done in it, the data loader's epochs, the
  step key, the partial epoch's metric sums, the best validation WA so far, the last
  validation) with its format version;
- 'data' (mid-epoch checkpoints only): the training loader's grain iterator state, written by
  grain's own orbax handler, one file per process (`process_<i>-of-<n>.json`), so each process
  resumes on its own share of the batches;
- 'model' (JSON): {'architecture', 'class_names', 'dataset', 'image_size'}, so a model
  can be rebuilt from the checkpoint alone (`load_model_from_checkpoint`, in
  arm_jax.training.checkpoint_reading, which reads it without importing orbax);
- 'metrics' (JSON, orbax's own): {'val_wa'} of a new best, {} for the others.
Checkpoints of arm-jax 0.1 before this layout (`checkpoints/latest/<step>`, `checkpoints/best/<step>`)
are read by evaluate, predict and serve, but not resumed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp

from arm_jax.errors import UserError
from arm_jax.training.checkpoint_reading import (  # noqa: F401 -- the reading side, re-exported
    KINDS, _describe, best_steps, load_model_from_checkpoint, read_model_info)
from arm_jax.training.distributed import barrier
from arm_jax.training.state import TrainState

log = logging.getLogger(__name__)

# Errors of a write that found no room (full disk, quota, file-size limit).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
_ARRAY_ITEMS = ("variables", "optimizer")
_JSON_ITEMS = ("progress", "model")
_DATA_ITEM = "data"


# The layout of the 'progress' item. A change of its fields is a new format: raise this, and
# checkpoints of the other format are refused by name instead of resuming with wrong values.
PROGRESS_FORMAT = 2  # 1: arm-jax 0.1 before one checkpoint manager (the data state in 'progress')


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands between two steps: what a resume needs besides the arrays."""

    step_key: tuple[int, ...]  # jax.random.key_data of the run's step key (checked against --seed)
    epoch: int = 0  # epochs finished
    batches_done: int = 0  # batches of epoch `epoch` trained
    data_loader: dict | None = None  # mid-epoch: the loader the 'data' item is of, {'first_epoch', 'last_epoch'}
    sums: dict | None = None  # the partial epoch's metric sums (training/loop.py `_Sums`)
    best_wa: float | None = None  # the best validation WA so far, after epoch `best_epoch` (1-based)
    best_epoch: int | None = None
    val: dict | None = None  # the last validation: {'wa', 'ua'}

    def to_json(self) -> dict:
        return {"format": PROGRESS_FORMAT, **dataclasses.asdict(self), "step_key": list(self.step_key)}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> Progress:
        """The Progress a checkpoint's JSON holds; a UserError naming `where` when its format or
        fields are not this version's."""
        fields = {field.name for field in dataclasses.fields(cls)}
        found = data.get("format")
        if found != PROGRESS_FORMAT:
            raise UserError(f"{where}: written by another version of arm-jax (progress format {found!r}; this "
                            f"version reads {PROGRESS_FORMAT}): resume it with that version, or train in a new --workdir")
        given = set(data) - {"format"}
        if given != fields:
            raise UserError(f"{where}: its progress item does not fit format {PROGRESS_FORMAT} (unknown fields: "
                            f"{sorted(given - fields) or 'none'}; missing: {sorted(fields - given) or 'none'})")
        values = {name: data[name] for name in given}
        return cls(**{**values, "step_key": tuple(values["step_key"])})


BEST_METRIC = "val_wa"


def _best_metric(metrics: dict) -> float:
    """A step's validation WA if it was a new best, else -inf (a step without metrics would make
    orbax warn at every save)."""
    return metrics.get(BEST_METRIC, -math.inf)


def _manager(directory: Path, keep: int, *, create: bool) -> ocp.CheckpointManager:
    """The newest `keep` steps and the best one (the only steps with a WA in their metrics are new bests)."""
    best = ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep), best])
    # best_fn too: orbax writes a step's metrics (and reads them back when it reopens, for the
    # policy) only where a best_fn is set.
    options = ocp.CheckpointManagerOptions(create=create, preservation_policy=policy, best_fn=_best_metric,
                                           best_mode="max")
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=_ARRAY_ITEMS + _JSON_ITEMS + (_DATA_ITEM,))


class _SavedIteratorState:
    """An iterator's state taken when the checkpoint is (grain's handler asks `get_state()` of what
    it saves; orbax may run it after the loop has read further)."""

    def __init__(self, state: bytes):
        self.state = state

    def get_state(self) -> bytes:
        return self.state


def _split(state: TrainState) -> dict:
    return {"variables": state.variables,
            "optimizer": {"opt_state": state.opt_state, "step": state.step}}


class Checkpoints:
    """The run's checkpoint manager. States go in and come out as numpy pytrees."""

    def __init__(self, workdir: str | Path, *, keep: int = 3):
        self.root = Path(workdir) / "checkpoints"
        earlier = [self.root / name for name in KINDS if (self.root / name).is_dir()]
        if earlier:
            raise UserError(f"{earlier[0]}: checkpoints in the layout of an earlier arm-jax 0.1 (checkpoints/latest "
                            "and checkpoints/best), which this version does not resume (0.1 keeps no compatibility "
                            "between its versions; evaluate, predict and serve still read them); train in a new "
                            "--workdir")
        self.keep = keep
        self._open()
        self._writing: int | None = None  # the step of a save that may be in flight
        self._restored: int | None = None  # the step restore_latest returned
        self._thread: ThreadPoolExecutor | None = None  # runs `save_in_background`'s jobs
        self._job: Future | None = None  # the one that may be running

    def _open(self) -> None:
        # Opening a manager lists its steps on process 0 and broadcasts them (a collective):
        # the processes must arrive within gloo's 30 s, whatever compiling held them up before.
        barrier("open checkpoints")
        self.manager = _manager(self.root, self.keep, create=True)

    def save(self, host_state: TrainState, progress: Progress, model_info: dict, *, best: bool = False,
             data_state: bytes | None = None) -> bool:
        """Save (asynchronously) at the state's step; False if that step is already saved.
        `best`: a new best validation WA (`progress.best_wa`), kept however old it gets;
        `data_state`: this process's training iterator state, mid-epoch (`restore_data` reads it)."""
        self._finish_job()
        return self._save(host_state, progress, model_info, best, data_state)

    def save_in_background(self, host_state: Callable[[], TrainState], progress: Progress,
                           model_info: dict, *, best: bool = False) -> None:
        """`save(host_state(), ...)` from a thread: the caller goes on at once.

        orbax's save blocks its caller ~0.35 s (a copy of the ~135 MB state, directories,
        metadata) before it writes in the background; at an epoch's end that is most of the gap
        between two epochs. `host_state` runs in the thread, so it must read a state no later
        step changes (`Parallel.snapshot`). The job ends when the files are written (orbax
        reports a failed write only then); whatever it raises (a full disk) is raised by
        `raise_if_failed` once it has ended, or by the next call that waits for it: `save`,
        `wait`, `latest_step`, `close`. With several processes it runs here and now: orbax's
        collectives must meet in the same order.
        """
        def job():
            self._save(host_state(), progress, model_info, best, None)
            self._wait_for_save()

        self._finish_job()
        if jax.process_count() > 1:
            job()
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save")
        self._job = self._thread.submit(job)

    def raise_if_failed(self) -> None:
        """Raise `save_in_background`'s error if its job has failed; do not wait for it."""
        if self._job is not None and self._job.done():
            self._finish_job()

    def _finish_job(self) -> None:
        """Wait for `save_in_background`'s job, raising its error if it failed."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def _save(self, host_state: TrainState, progress: Progress, model_info: dict, best: bool,
              data_state: bytes | None) -> bool:
        step = int(host_state.step)
        if step in self.manager.all_steps():
            return False  # e.g. interrupted again right after resuming: nothing new
        items = {name: ocp.args.StandardSave(tree) for name, tree in _split(host_state).items()}
        items["progress"] = ocp.args.JsonSave(progress.to_json())
        items["model"] = ocp.args.JsonSave(model_info)
        if data_state is not None:
            items[_DATA_ITEM] = grain.checkpoint.CheckpointSave(_SavedIteratorState(data_state))
        # orbax's save first finishes the previous one; finishing it here, apart, lets a failed
        # write be reported under its own step rather than this one.
        self._wait_for_save()
        try:
            self.manager.save(step, args=ocp.args.Composite(**items),
                              metrics={BEST_METRIC: progress.best_wa} if best else {})
        except Exception as err:
            self._raise_if_no_space(err, step)
            raise
        self._writing = step
        return True

    def latest_step(self) -> int | None:
        self._finish_job()
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step of the best validation WA (None before the first epoch end)."""
        self._finish_job()
        return next(iter(best_steps(self.root)), None)

    def restore_latest(self, target: TrainState) -> tuple[TrainState, Progress] | None:
        """The newest intact checkpoint as (numpy state, progress), or None if there is none.

        `target` (a state of the same structure, e.g. freshly initialised) gives the tree
        structure: without it orbax returns optax's named tuples as lists. Newer checkpoints
        that do not restore (incomplete, truncated, garbage JSON) are skipped with a warning
        and set aside as `<step>.corrupt`, so the resumed run can save those steps again.
        """
        host_target = jax.tree.map(np.asarray, _split(target))
        items = {name: ocp.args.StandardRestore(tree) for name, tree in host_target.items()}
        items["progress"] = ocp.args.JsonRestore()
        barrier("restore")  # orbax's restore runs collectives
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            where = self.root / str(step)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                progress = restored["progress"]
                if not isinstance(progress, dict) or "epoch" not in progress:
                    raise ValueError("its 'progress' item is not a training position")
            except Exception as err:  # orbax raises many types (ValueError, KeyError, OSError...)
                log.warning("%s: skipped, cannot restore it (%s); trying the one before", where,
                            _describe(err))
                failures.append(where)
                continue
            progress = Progress.from_json(progress, where)  # another format: refused, not set aside
            self._set_aside(failures)
            self._restored = step
            optimizer = restored["optimizer"]
            state = TrainState(step=optimizer["step"], opt_state=optimizer["opt_state"],
                               **restored["variables"])
            return state, progress
        if failures:
            raise UserError(f"{self.root}: no intact checkpoint: all {len(failures)} are incomplete, corrupt or "
                            f"from an incompatible model/optimizer (newest: {failures[0].name})")
        return None

    def restore_data(self, iterator) -> None:
        """Set the training loader's `iterator` (opened over the restored Progress's `data_loader`)
        to where the checkpoint `restore_latest` returned left this process's share."""
        self.manager.restore(self._restored, args=ocp.args.Composite(
            **{_DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator)}))

    def _set_aside(self, corrupt: list[Path]) -> None:
        """Rename the corrupt steps (all newer than the resumed one) out of orbax's sight: orbax
        silently skips saving a step at or below its newest."""
        barrier("listed checkpoints")  # every process has looked before process 0 renames
        if jax.process_index() == 0:
            for path in corrupt:
                aside = _free_name(path, "corrupt")
                os.replace(path, aside)
                log.warning("%s: set aside as %s", path, aside.name)
        barrier("set aside")
        if corrupt:
            self._close_manager()
            self._open()

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._finish_job()
        self._wait_for_save()

    def _wait_for_save(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            self._raise_if_no_space(err, self._writing)
            raise

    def close(self) -> None:
        self._close_manager()

    def _close_manager(self) -> None:
        try:
            self._finish_job()
        finally:
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
            self.manager.close()

    def _raise_if_no_space(self, err: BaseException, step: int | None) -> None:
        """A save that failed for want of space: a UserError naming the checkpoint."""
        if not _is_no_space(err):
            return
        where = self.root / (str(step) if step is not None else "")
        intact = [s for s in self.manager.all_steps() if s != step]
        kept = (f"the checkpoints of steps {', '.join(map(str, sorted(intact)))} are intact"
                if intact else "no older checkpoint exists")
        OrbaxReportFilter.raised = True
        raise UserError(f"{where}: no space left on the device while saving this checkpoint "
                        f"({_describe(err)}); {kept}. Free space (or move --workdir) and run the "
                        "same command again to resume") from err


def _is_no_space(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):  # tensorstore's errors carry no errno
            return True
        err = err.__cause__ or err.__context__
    return False


# What orbax's background threads report when the process stops them mid-save (seen once in
# CI, racing the exit after a full disk): a follow-on of the failure already raised.
_SHUTDOWN_TEXT = "cannot schedule new futures after shutdown"


class OrbaxReportFilter(logging.Filter):
    """For an application's logging (the `arm-jax` command puts it on absl's logger, orbax's; the
    library changes no logger): drops orbax's ERROR records (each with a traceback, ~300 lines in
    all) for a write that found no room, which `Checkpoints` raises once, as a UserError naming
    the step; after that, also the shutdown reports of orbax's threads that the exit interrupts."""

    raised = False  # set when Checkpoints raised the no-space UserError

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a malformed record is the handler's to report, not ours
            return True
        if _is_no_space(error) or any(text in message for text in _NO_SPACE_TEXT):
            return False
        return not (self.raised and (_SHUTDOWN_TEXT in message or _SHUTDOWN_TEXT in str(error)))


def _free_name(path: Path, suffix: str) -> Path:
    aside = path.with_name(f"{path.name}.{suffix}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{suffix}{n}")
    return aside
