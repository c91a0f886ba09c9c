"""The training loop: epochs of pure steps, validation, logs, checkpoints, resume, signals."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from arm_jax import metrics as metrics_lib
from arm_jax.training.actions import Action, FirstStepReport, MidEpochCheckpoints, StepTimes
from arm_jax.training.checkpoints import Checkpoints, Progress
from arm_jax.training.config import TrainConfig, check_resumable, save_config
from arm_jax.training.feed import NoTimings, Timings, TrainBatches, ValidationBatches
from arm_jax.data.base import LabelledSplit, Subset
from arm_jax.errors import UserError
from arm_jax.models import ARMResNet18, architecture, with_runtime
from arm_jax.models.resnet import largest_activation_bytes
from arm_jax.training.optim import lr_at_epoch, make_optimizer
from arm_jax.training.parallel import Parallel, make_parallel
from arm_jax.training.state import TrainState
from arm_jax.training.steps import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class LossIsNaN(UserError):
    """Training diverged; the last good checkpoint is kept."""


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and returns.

    A second signal gets the default behaviour (SIGINT: KeyboardInterrupt), so an impatient
    user can still break out of a slow save. `request` stops at a known step (tests).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def request(self, signum: int) -> None:
        """Stop as the signal `signum` would, without a signal."""
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


# The compiled steps, as `Parallel.compile_train` / `compile_eval` return them.
TrainStep = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
EvalStep = Callable[[TrainState, dict], dict]


@dataclasses.dataclass(frozen=True)
class Run:
    """What the epoch loop needs besides the state: built once by `_setup`."""

    config: TrainConfig
    workdir: Path
    par: Parallel  # how states and batches meet the devices, and how steps are compiled
    train_step: TrainStep  # compiled: (state, batch, key) -> (state, metrics)
    evaluate: EvalStep  # compiled: (state, batch) -> {'confusion', 'loss_sum', ...}
    train_split: LabelledSplit
    val_split: LabelledSplit
    steps_per_epoch: int
    local_batch: int
    data_seed: int
    step_key: jax.Array
    model_info: dict
    ckpt: Checkpoints
    is_main: bool


def _open_data(config: TrainConfig) -> tuple[LabelledSplit, LabelledSplit]:
    from arm_jax.data.sources import decode_size_hint
    from arm_jax.data.splits import open_split

    splits = []
    for split, limit in (("train", config.max_train_examples), (config.eval_split, config.max_eval_examples)):
        data = open_split(config.dataset, config.data_dir, split, skip_bad=config.skip_bad,
                          image_size_hint=decode_size_hint(config.dataset, config.image_size))
        splits.append(Subset(data, limit, config.seed) if limit else data)
    train_split, val_split = splits
    if tuple(train_split.class_names) != tuple(val_split.class_names):
        raise UserError(f"{train_split.name} and {val_split.name} name their classes differently")
    return train_split, val_split


def _keys(seed: int):
    """Seed once: init key, data seed (an int for grain), step key."""
    init_key, data_key, step_key = jax.random.split(jax.random.key(seed), 3)
    data_seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
    return init_key, data_seed, step_key


def _key_data(key: jax.Array) -> tuple[int, ...]:
    """A random key as the plain integers a checkpoint's Progress holds."""
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def _setup(config: TrainConfig) -> tuple[Run, TrainState, Progress]:
    """Open the data, build model/optimiser/steps, and resume from the latest checkpoint."""
    from arm_jax.interop.pretrained import init_variables
    from arm_jax.data.pipeline import steps_in_epoch

    workdir = Path(config.workdir)
    if (workdir / "config.json").exists() and any((workdir / "checkpoints").glob("[0-9]*")):
        check_resumable(config, workdir)  # a run to resume: it must be the same run
    if config.pretrained == "none":
        log.warning("the backbone starts from random weights (--pretrained none); the paper's numbers "
                    "need the ImageNet resnet18 weights: --pretrained imagenet")
    par = make_parallel(config.parallel)
    par.check_batch_size(config.batch_size, "batch_size")
    processes = jax.process_count()
    if config.batch_size % processes:
        raise UserError(f"option batch_size: {config.batch_size} does not split over {processes} hosts")
    local_batch = config.batch_size // processes
    train_split, val_split = _open_data(config)
    steps_per_epoch = steps_in_epoch(train_split, local_batch, sampler=config.sampler, train=True,
                                     shard_count=processes)
    if steps_per_epoch == 0:
        raise UserError(f"{train_split.name}: {len(train_split)} records make no full batch of "
                        f"{config.batch_size}; lower --batch-size")

    try:
        model = ARMResNet18(
            num_classes=len(train_split.class_names), image_size=config.image_size,
            arrangement=config.arrangement, de_albino=config.de_albino, affinity=config.affinity,
            raw_kernel=config.raw_kernel, dropout_rate=config.dropout, gar_mode=config.gar_mode,
            dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)
    except ValueError as error:  # the options give no model (e.g. --image-size too small for the head)
        raise UserError(f"--image-size {config.image_size} and the architecture options: {error}") from None
    tx = make_optimizer(config, steps_per_epoch)
    init_key, data_seed, step_key = _keys(config.seed)
    pretrained = None if config.pretrained.lower() == "none" else config.pretrained
    init_model = with_runtime(model, dtype=jnp.float32)
    ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
    progress = Progress(step_key=_key_data(step_key))
    restored = None
    if ckpt.latest_step() is not None:
        # Resuming: the checkpoint holds every value, so the restore target needs only the
        # state's structure, shapes and dtypes (zeros cost no work: initialising the model and
        # Adam's state for real took ~2 s of each relaunch).
        shapes = jax.eval_shape(lambda: TrainState.create(init_variables(init_model, init_key), tx))
        restored = ckpt.restore_latest(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes))
    if restored is None:  # a new run
        state = jax.tree.map(np.asarray, TrainState.create(init_variables(init_model, init_key, pretrained), tx))
    else:
        state, progress = restored
        log.info("resuming from %s at epoch %d, batch %d (step %d)", ckpt.root,
                 progress.epoch + 1, progress.batches_done, int(state.step))
    is_main = jax.process_index() == 0
    if is_main:
        save_config(config, workdir)  # after the check: records the (possibly raised) epochs

    image_size = config.image_size
    run = Run(
        config=config, workdir=workdir, par=par, train_split=train_split, val_split=val_split,
        steps_per_epoch=steps_per_epoch, local_batch=local_batch, data_seed=data_seed,
        step_key=step_key,
        train_step=par.compile_train(
            make_train_step(par.model(model), tx),
            # This process's whole batch: under --parallel jit an upper bound of one device's share.
            largest_intermediate_bytes=largest_activation_bytes(local_batch, image_size)),
        evaluate=par.compile_eval(lambda axis: make_eval_step(with_runtime(model, axis_name=axis))),
        model_info={"architecture": architecture(model), "class_names": list(train_split.class_names),
                    "dataset": config.dataset, "image_size": image_size, "gar_mode": config.gar_mode},
        ckpt=ckpt, is_main=is_main)
    return run, state, progress


def _val_loader(run: Run, passes: int = 1):
    """The validation batches of `passes` epochs from one loader, whose workers start once; every
    pass the same batches (training: feed.TrainBatches)."""
    from arm_jax.data.pipeline import make_loader

    c = run.config
    # Every host reads the whole (small) validation split; Parallel shards it. With the batch
    # GAR the released code's predictions depend on which images share a batch; index order
    # would put near-single-class batches together (sources are often sorted by class), so
    # evaluation batches are shuffled, the same way every epoch.
    return make_loader(run.val_split, batch_size=c.eval_batch_size, seed=run.data_seed, epochs=(0, passes),
                       train=False, image_size=c.image_size, worker_count=c.worker_count,
                       shuffle_eval=c.gar_mode == "batch")


def validate(run: Run, state, batches=None) -> dict:
    """WA, UA, per-class accuracy and loss over the validation split (`batches`: its batches,
    e.g. prefetched; default: read now)."""
    num_classes = len(run.val_split.class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    loss_sum = 0.0
    for batch in _val_loader(run) if batches is None else batches:
        out = run.evaluate(state, batch)
        confusion += out["confusion"]
        loss_sum += float(out["loss_sum"])
    summary = metrics_lib.summarize(confusion, run.val_split.class_names)
    summary["loss"] = loss_sum / max(summary["count"], 1)
    summary["confusion"] = confusion.tolist()
    return summary


class _Sums:
    """The epoch's training loss/correct/count. A step's metrics are fetched once the next step is
    dispatched: fetching them at once would idle the device while the host waits for them."""

    def __init__(self, saved: dict | None, fetch: Callable[[dict], dict]):
        self.values = dict(saved or {"loss_sum": 0.0, "correct": 0, "count": 0})
        self.fetch = fetch  # Parallel.fetch
        self.pending = None  # (metrics, step) of the last step, not fetched yet

    def push(self, metrics, step: int) -> tuple[float, int] | None:
        """Hold this step's metrics; `flush` the previous step's."""
        fetched = self.flush()
        self.pending = metrics, step
        return fetched

    def flush(self) -> tuple[float, int] | None:
        """Add the pending step's metrics to the sums: (its loss, its step), or None if none was pending."""
        if self.pending is None:
            return None
        (metrics, step), self.pending = self.pending, None
        host = self.fetch(metrics)
        loss = float(host["loss_sum"])
        self.values["loss_sum"] += loss
        self.values["correct"] += int(host["correct"])
        self.values["count"] += int(host["count"])
        return loss, step


def _check_loss(run: Run, fetched: tuple[float, int] | None) -> None:
    """Raise LossIsNaN if a fetched step's loss (`_Sums.flush`) is not finite."""
    if fetched is None or math.isfinite(fetched[0]):
        return
    loss, step = fetched
    epoch, batch = divmod(step - 1, run.steps_per_epoch)
    run.ckpt.wait()
    last = run.ckpt.latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was saved yet"
    raise LossIsNaN(f"loss is {loss} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
                    f"stopped without saving that state; {kept} in {run.ckpt.root}. "
                    "Lower --lr, or check the data.")


class _Epoch:
    """One epoch's running sums and position in the data: what a mid-epoch checkpoint saves."""

    def __init__(self, run: Run, progress: Progress, batches: TrainBatches):
        self.run, self.start, self.batches = run, progress, batches
        self.sums = _Sums(progress.sums, run.par.fetch)

    def push(self, metrics, step: int) -> None:
        """Hold this step's metrics; fetch and check the previous step's."""
        _check_loss(self.run, self.sums.push(metrics, step))

    def flush(self) -> None:
        """Fetch and check the last step's metrics."""
        _check_loss(self.run, self.sums.flush())

    def progress(self, batches_done: int) -> Progress:
        return dataclasses.replace(self.start, batches_done=batches_done, sums=self.sums.values)

    def save(self, state, batches_done: int) -> None:
        """A checkpoint of the position after `batches_done` batches (never of a state whose loss is unchecked)."""
        self.flush()
        loader, data_state = self.batches.position()
        at = dataclasses.replace(self.progress(batches_done), data_loader=loader)
        self.run.ckpt.save(self.run.par.host_state(state), at, self.run.model_info, data_state=data_state)


def train_epoch(run: Run, state, epoch: _Epoch, stop: StopRequest, validation: ValidationBatches,
                actions: Sequence[Action]):
    """The epoch's training steps (its rest, when resuming mid-epoch), each followed by the `actions`,
    until the epoch ends or a stop is requested. Returns (state, batches done); the last step's
    metrics are still to be fetched (`epoch.flush`)."""
    index, batch_index = epoch.start.epoch, epoch.start.batches_done
    with _progress_bar(run, index, batch_index) as bar:
        while batch_index < run.steps_per_epoch and stop.signum is None:
            if run.steps_per_epoch - batch_index <= validation.LEAD_STEPS:
                validation.prepare()  # so that validation batches are ready when the last step is
            batch = epoch.batches.next(index)
            state, metrics = run.train_step(state, run.par.put_batch(batch), run.step_key)
            batch_index += 1
            step = index * run.steps_per_epoch + batch_index
            epoch.push(metrics, step)  # the previous step's metrics are fetched now, not before this dispatch
            for action in actions:
                action(step, state)
            bar.update(1)
    return state, batch_index


def _progress_bar(run: Run, epoch: int, start: int) -> tqdm:
    c = run.config
    return tqdm(total=run.steps_per_epoch, initial=start, unit="img", unit_scale=c.batch_size,
                desc=f"epoch {epoch + 1}/{c.epochs}", leave=False,
                disable=c.quiet or not run.is_main or not sys.stderr.isatty())


def _epoch_record(run: Run, epoch: int, state, sums: dict, val: dict, seconds: float) -> dict:
    count = max(sums["count"], 1)
    return {
        "epoch": epoch + 1, "step": int(run.par.host_state(state.step)),
        "train_loss": sums["loss_sum"] / count, "train_acc": sums["correct"] / count,
        "val_wa": val["wa"], "val_ua": val["ua"], "val_loss": val["loss"],
        "val_per_class": val["per_class"], "val_confusion": val["confusion"], "lr": lr_at_epoch(run.config, epoch),
        "time_s": seconds,
    }


def _tensorboard(config: TrainConfig, workdir: Path):
    if not config.tensorboard or jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    except ImportError as err:
        raise UserError("--tensorboard needs the tensorboardX package (pip install tensorboardX); "
                        "TensorFlow is not needed") from err
    return SummaryWriter(logdir=str(workdir / "tensorboard"))


def train(config: TrainConfig, *, after_step=None, timings=None) -> dict:
    """Train (or resume training) as `config` says; returns a summary dict.

    The summary's 'status' is 'done', or 'interrupted' (with 'signal') after SIGINT/SIGTERM,
    in which case a checkpoint of the exact position (mid-epoch included) has been saved
    and re-running with the same workdir continues bit for bit. `after_step(step, stop)`
    runs after each step (first of its actions); `stop.request(signal.SIGTERM)` there stops
    as SIGTERM would. `timings` (feed.Timings), if given, records where the wall time goes
    (benchmarks).
    """
    from arm_jax.training.workdir_lock import workdir_lock

    if config.distributed:
        from arm_jax.training.distributed import initialize

        initialize()
    with workdir_lock(config.workdir, enabled=jax.process_index() == 0):
        try:
            return _train(config, after_step, NoTimings() if timings is None else timings)
        except Exception as err:
            if config.distributed:  # a lost peer: say which, instead of a collective's traceback
                from arm_jax.training.distributed import lost_peer_message

                if message := lost_peer_message(err):
                    raise UserError(message) from err
            raise


def _train(config: TrainConfig, after_step, timings: Timings) -> dict:
    started = time.perf_counter()
    writer = _tensorboard(config, Path(config.workdir))
    run, host_state, progress = _setup(config)
    if progress.step_key != _key_data(run.step_key):
        raise UserError(f"{run.ckpt.root}: its step key differs from seed {config.seed}'s")
    state = run.par.put_state(host_state)
    batches = TrainBatches(run.train_split, config, batch_size=run.local_batch, seed=run.data_seed,
                           steps_per_epoch=run.steps_per_epoch)
    batches.resume(progress, run.ckpt.restore_data)
    # Opened when first needed (near the end of this launch's first epoch), for the epochs left then.
    validation = ValidationBatches(lambda: _val_loader(run, passes=config.epochs - progress.epoch),
                                   records=len(run.val_split), batch_size=config.eval_batch_size)
    last = {}
    with StopRequest() as stop:
        actions = [] if after_step is None else [lambda step, _: after_step(step, stop)]
        actions.append(FirstStepReport(run.par.snapshot, batches))
        try:
            while progress.epoch < config.epochs:
                epoch = progress.epoch
                t0 = time.perf_counter()
                this_epoch, times = _Epoch(run, progress, batches), StepTimes(timings, batches, epoch)
                every_step = [*actions, MidEpochCheckpoints(run.ckpt, config.checkpoint_every_steps,
                                                            run.steps_per_epoch, this_epoch.save),
                              times]  # times last: a step's time includes the other actions'
                state, done = train_epoch(run, state, this_epoch, stop, validation, every_step)
                with times.last_fetch():
                    this_epoch.flush()
                progress = this_epoch.progress(done)
                if stop.signum is not None and done < run.steps_per_epoch:
                    this_epoch.save(state, done)
                    return _interrupted(run, stop, progress, started)
                train_seconds = time.perf_counter() - t0
                validating = time.perf_counter()
                val = validate(run, state, timings.timed(validation.batches(), "val_batch", epoch))
                timings.add("validate", epoch, validating)
                epoch_end = time.perf_counter()
                record = _epoch_record(run, epoch, state, progress.sums, val, train_seconds)
                record["images_per_s"] = progress.sums["count"] / max(train_seconds, 1e-9)
                best = progress.best_wa is None or val["wa"] > progress.best_wa
                progress = dataclasses.replace(
                    progress, epoch=epoch + 1, batches_done=0, data_loader=None, sums=None,
                    val={"wa": val["wa"], "ua": val["ua"]},
                    **({"best_wa": val["wa"], "best_epoch": epoch + 1} if best else {}))
                # Written from a thread while the next epoch trains, from a copy of the state
                # (the next step donates `state`'s buffers).
                run.ckpt.save_in_background(functools.partial(run.par.host_state, run.par.snapshot(state)),
                                            progress, run.model_info, best=best)
                _report(run, record, writer)
                timings.add("epoch_end", epoch, epoch_end)
                last = record
                if stop.signum is not None:
                    return _interrupted(run, stop, progress, started)
        finally:
            validation.close()
            batches.close()
            run.ckpt.wait()
            if writer is not None:
                writer.close()
    run.ckpt.close()
    return {"status": "done", "workdir": str(run.workdir), "epochs": progress.epoch,
            "step": int(run.par.host_state(state.step)), "val_wa": last.get("val_wa"),
            "val_ua": last.get("val_ua"), "best_val_wa": progress.best_wa,
            "best_epoch": progress.best_epoch, "wall_s": time.perf_counter() - started}


def _report(run: Run, record: dict, writer) -> None:
    if not run.is_main:
        return
    log.info("epoch %d/%d  train loss %.4f acc %.4f  val WA %.4f UA %.4f  lr %.3g  %.0f s (%.1f img/s)",
             record["epoch"], run.config.epochs, record["train_loss"], record["train_acc"],
             record["val_wa"], record["val_ua"], record["lr"], record["time_s"], record["images_per_s"])
    with open(run.workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key in ("train_loss", "train_acc", "val_wa", "val_ua", "val_loss", "lr", "images_per_s"):
            writer.add_scalar(key, record[key], record["step"])
        writer.flush()


def _interrupted(run: Run, stop: StopRequest, progress: Progress, started: float) -> dict:
    run.ckpt.wait()
    step = run.ckpt.latest_step()
    log.warning("%s: saved a checkpoint at step %s (epoch %d, batch %d) in %s; run the same command "
                "again to resume", stop.name, step, progress.epoch + 1, progress.batches_done,
                run.ckpt.root)
    return {"status": "interrupted", "signal": stop.name, "signum": stop.signum,
            "workdir": str(run.workdir), "step": step, "epoch": progress.epoch,
            "batches_done": progress.batches_done, "wall_s": time.perf_counter() - started}
