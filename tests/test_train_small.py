"""The training loop in the fast tier: train() as users call it, with the model it builds swapped for
tests/small_models.TinyARM (ARMResNet18's blocks and fields, small) and that model's fresh variables
drawn in numpy (tiny_arm_variables), so a run compiles in seconds.

Checked: which checkpoints are kept as latest and as best (validation WA scripted per epoch, as in
test_train's slow version), the log, a run against a hand-written loop over the same batches (data
order, lr schedule, step key, the epoch's sums, validation), resume mid-epoch and after an epoch's
end, and a bf16 run's state and convolutions (a Subset's image/label pairs: test_sources). The
full-model versions are test_train's and test_train_options' slow tests.
"""

import contextlib
import json
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arm_jax.data.base import Subset
from arm_jax.data.pipeline import batch_positions, make_loader, read_through
from arm_jax.data.splits import open_split
from arm_jax.interop import pretrained
from arm_jax.models.resnet import largest_activation_bytes
from arm_jax.training import loop
from arm_jax.training.checkpoints import best_steps, read_model_info
from arm_jax.training.config import TrainConfig
from arm_jax.training.optim import make_optimizer
from arm_jax.training.parallel import make_parallel
from arm_jax.training.state import TrainState
from arm_jax.training.steps import make_eval_step, make_train_step
from tests.small_models import TinyARM, tiny_arm_variables
from tests.test_steps import _conv_operand_dtypes

# 16 training images / batch 8 = 2 steps an epoch, 4 epochs; 12 validation images = a batch of 8
# and a short one of 4 (the validation loader pads it, the loop must cut the padding off).
SMALL = dict(dataset="synthetic", image_size=16, batch_size=8, eval_batch_size=8, max_train_examples=16,
             max_eval_examples=12, epochs=4, parallel="none", checkpoint_every_steps=0, quiet=True)
STEPS_PER_EPOCH, STEPS = 2, 8
# Validation WA scripted per epoch: best at epoch 2, equalled (not beaten) at epoch 3. The scripted
# loss falls every epoch, so a best chosen by loss, by the last epoch or by >= lands elsewhere.
SCRIPTED_WA = (0.2, 0.6, 0.6, 0.5)
SCRIPTED_LOSS = (2.0, 1.9, 1.8, 1.7)


def _fresh_variables(model, key, weights=None) -> dict:
    """init_variables for TinyARM, drawn in numpy from the key's bits (a compiled init would spend
    ~15 s of CPU compiling its random draws; interop.pretrained's own tests run the real one)."""
    assert weights is None
    with jax.ensure_compile_time_eval():  # a resume calls it inside jax.eval_shape: the key is concrete
        seed = np.asarray(jax.random.key_data(key)).tolist()
    return tiny_arm_variables(model, seed=seed)


@contextlib.contextmanager
def small_model_and_scripted_validation(real: dict | None = None):
    """train() builds TinyARM (fresh variables from _fresh_variables); validation runs for real (its
    result, by epoch, goes into `real`) and reports SCRIPTED_WA / SCRIPTED_LOSS for that epoch."""
    real_validate = loop.validate

    def scripted(run, state, *batches):
        result = real_validate(run, state, *batches)
        epoch = int(run.par.host_state(state.step)) // run.steps_per_epoch
        if real is not None:
            real[epoch] = result
        return {**result, "wa": SCRIPTED_WA[epoch - 1], "loss": SCRIPTED_LOSS[epoch - 1]}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "ARMResNet18", TinyARM)
        patch.setattr(pretrained, "init_variables", _fresh_variables)  # loop._setup imports it when called
        patch.setattr(loop, "validate", scripted)
        yield


def _train(workdir, stop_at=None, real=None, **overrides) -> dict:
    hook = None if stop_at is None else (lambda step, stop: step == stop_at and stop.request(signal.SIGTERM))
    with small_model_and_scripted_validation(real):
        return loop.train(TrainConfig(**{**SMALL, **overrides}, workdir=str(workdir)), after_step=hook)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(workdir, summary, real validation results by epoch) of an uninterrupted 4-epoch run."""
    workdir, real = tmp_path_factory.mktemp("small_run"), {}
    summary = _train(workdir, real=real)
    assert summary["status"] == "done" and summary["step"] == STEPS
    return workdir, summary, real


def _stored(step_dir: Path, item: str = "variables"):
    """A checkpoint's array item as written (numpy arrays), read with orbax alone."""
    return ocp.PyTreeCheckpointer().restore((step_dir / item).absolute())


def _progress(step_dir: Path) -> dict:
    """A checkpoint's 'progress' item (JSON)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore((step_dir / "progress").absolute())


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _records(workdir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("time_s"), record.pop("images_per_s")
    return records


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_keeps_the_last_3_checkpoints_and_the_best_by_validation_wa(small_run):
    workdir, summary, _ = small_run
    assert (summary["best_val_wa"], summary["best_epoch"]) == (0.6, 2)
    assert _steps(workdir) == [4, 6, 8] and best_steps(workdir / "checkpoints") == [4]
    assert read_model_info(workdir, which="best")[1] == 4 and read_model_info(workdir, which="latest")[1] == 8
    assert _progress(workdir / "checkpoints" / "4")["best_epoch"] == 2

    records = _records(workdir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r["val_wa"] for r in records] == list(SCRIPTED_WA)
    config = TrainConfig()
    assert [r["lr"] for r in records] == pytest.approx([config.lr * config.lr_gamma**e for e in range(4)])


def test_trains_as_a_hand_written_loop_over_the_same_batches(small_run):
    """The loop's run equals this loop: epoch e's batches from make_loader(epoch=e) with their
    records' places in the epoch (pipeline.batch_positions, what augmentation is drawn from), the training
    step compiled as the loop compiles it (so the same program, bitwise), Adam's schedule at 2 steps
    an epoch; each epoch's logged train loss/accuracy are its steps' sums; validation's WA, UA
    and loss are numpy's over the predictions of the shuffled validation batches."""
    workdir, _, real = small_run
    config = TrainConfig(**SMALL)
    init_key, data_seed, step_key = loop._keys(config.seed)  # the loop's seeding
    train_split = Subset(open_split("synthetic", None, "train"), config.max_train_examples, config.seed)
    val_split = Subset(open_split("synthetic", None, "val"), config.max_eval_examples, config.seed)
    model = TinyARM(num_classes=7, image_size=config.image_size)
    tx = make_optimizer(config, STEPS_PER_EPOCH)
    par = make_parallel("none")
    train_step = par.compile_train(make_train_step(model, tx),
                                   largest_intermediate_bytes=largest_activation_bytes(8, config.image_size))
    evaluate = jax.jit(make_eval_step(model))
    state = par.put_state(jax.tree.map(np.asarray, TrainState.create(_fresh_variables(model, init_key), tx)))
    records = _records(workdir)
    common = dict(batch_size=8, seed=data_seed, image_size=config.image_size, shard_index=0, shard_count=1)
    for epoch in range(config.epochs):
        loss_sum, correct, count = 0.0, 0, 0
        for step, batch in enumerate(read_through(make_loader(train_split, epoch=epoch, train=True, **common))):
            batch = {**batch, **batch_positions(epoch, step, batch_size=8, shard_index=0, shard_count=1)}
            state, metrics = train_step(state, par.put_batch(batch), step_key)
            loss_sum += float(metrics["loss_sum"])
            correct, count = correct + int(metrics["correct"]), count + int(metrics["count"])
        assert count == 16
        assert records[epoch]["train_loss"] == pytest.approx(loss_sum / count, rel=1e-12)
        assert records[epoch]["train_acc"] == correct / count

        labels, predicted, val_loss = [], [], 0.0
        for batch in read_through(make_loader(val_split, epoch=0, train=False, shuffle_eval=True, **common)):
            out = evaluate(state, batch)
            labels.append(batch["label"])
            predicted.append(np.asarray(out["logits"]).argmax(-1))
            val_loss += float(out["loss_sum"])
        labels, predicted = np.concatenate(labels), np.concatenate(predicted)
        assert len(labels) == 12
        validation = real[epoch + 1]
        assert validation["wa"] == pytest.approx(np.mean(labels == predicted), abs=1e-12)
        recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
        assert validation["ua"] == pytest.approx(np.mean(recalls), abs=1e-12)
        assert validation["loss"] == pytest.approx(val_loss / len(labels), rel=1e-6)
    assert int(state.step) == STEPS
    _assert_bitwise_equal(_stored(workdir / "checkpoints" / str(STEPS)),
                          jax.tree.map(np.asarray, state.variables))


def test_resume_mid_epoch_and_after_an_epoch_end_equals_the_uninterrupted_run(small_run, tmp_path):
    """Stopped at step 3 (mid-epoch 2), then at step 6 (the end of epoch 3: validated, logged, saved),
    then run to the end: the same parameters bit for bit, the same log, the same best checkpoint."""
    workdir, reference_summary, _ = small_run
    first = _train(tmp_path, stop_at=3)
    assert first["status"] == "interrupted" and (first["epoch"], first["batches_done"], first["step"]) == (1, 1, 3)
    second = _train(tmp_path, stop_at=6)
    assert second["status"] == "interrupted" and (second["epoch"], second["batches_done"], second["step"]) == (3, 0, 6)
    assert len(_records(tmp_path)) == 3
    third = _train(tmp_path)
    assert third["status"] == "done" and third["step"] == STEPS
    assert (third["best_val_wa"], third["best_epoch"]) == (reference_summary["best_val_wa"], reference_summary["best_epoch"])
    assert best_steps(tmp_path / "checkpoints") == [4]
    assert _records(tmp_path) == _records(workdir)
    latest = Path("checkpoints") / str(STEPS)
    _assert_bitwise_equal(_stored(tmp_path / latest), _stored(workdir / latest))
    _assert_bitwise_equal(_stored(tmp_path / latest, "optimizer"), _stored(workdir / latest, "optimizer"))


def test_a_bfloat16_run_starts_from_float32_state_and_steps_in_bf16(tmp_path):
    """--dtype bfloat16 as the loop sets it up: parameters, Adam's state, BatchNorm statistics and
    the GAR start float32 and stay float32 after its training step (traced, not compiled), whose
    convolutions all take bf16 operands."""
    with small_model_and_scripted_validation():
        run, state, _ = loop._setup(TrainConfig(**SMALL, dtype="bfloat16", workdir=str(tmp_path)))
    try:
        dtypes = {np.asarray(x).dtype.name for x in jax.tree.leaves(state)}
        assert dtypes == {"float32", "int32"}, dtypes
        batch = next(read_through(make_loader(run.train_split, batch_size=8, seed=0, epoch=0, train=True,
                                              image_size=16, shard_index=0, shard_count=1)))
        batch = {**batch, **batch_positions(0, 0, batch_size=8, shard_index=0, shard_count=1)}
        jaxpr = run.train_step.trace(state, batch, run.step_key).jaxpr  # a top-level jit: make_jaxpr would nest it
        convs = _conv_operand_dtypes(jaxpr.jaxpr)
        assert len(convs) >= 10 and all(operands == {"bfloat16"} for operands in convs), convs
        new_state = jaxpr.out_avals[:len(jax.tree.leaves(state))]
        assert {x.dtype.name for x in new_state} == {"float32", "int32"}
    finally:
        run.ckpt.close()

