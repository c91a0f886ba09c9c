"""Checkpoints: exact round trip (arrays and optax state types), background saves, model rebuild, bad files."""

import threading
import time

import jax
import numpy as np
import optax
import pytest

from arm_jax.training.checkpoints import Checkpoints, load_model_from_checkpoint
from arm_jax.training.config import TrainConfig
from arm_jax.interop.pretrained import init_variables
from arm_jax.errors import UserError
from arm_jax.models import ARMResNet18, architecture
from arm_jax.training.optim import make_optimizer
from arm_jax.training.state import TrainState


@pytest.fixture(scope="module")
def model_and_state():
    model = ARMResNet18(num_classes=7, image_size=96)
    variables = init_variables(model, jax.random.key(0))
    tx = make_optimizer(TrainConfig(), steps_per_epoch=5)
    state = TrainState.create(variables, tx)
    # Make every leaf distinctive (non-zero moments, a step count), as after training.
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: np.asarray(a + rng.normal(size=np.shape(a)).astype(a.dtype))
                         if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a) + 3,
                         state)
    return model, state


def _info(model):
    return {"architecture": architecture(model), "class_names": list("abcdefg"),
            "dataset": "synthetic", "image_size": 96}


def test_round_trip_is_exact_and_keeps_optax_types(tmp_path, model_and_state):
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path, keep=2)
    progress = {"epoch": 1, "batches_done": 2, "data_state": '{"a": 1}', "rng": [1, 2]}
    assert ckpt.save(state, progress, _info(model))
    assert not ckpt.save(state, progress, _info(model))  # same step: nothing new
    ckpt.wait()
    fresh = jax.tree.map(np.zeros_like, state)
    restored, got_progress = Checkpoints(tmp_path).restore_latest(fresh)
    assert got_progress == progress
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored.opt_state[1], optax.ScaleByAdamState)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    arch, names, variables = load_model_from_checkpoint(tmp_path, which="latest")
    assert ARMResNet18(**arch) == model and names == list("abcdefg")
    for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(variables), strict=True):
        assert np.array_equal(a, np.asarray(b))
    # No best checkpoint yet (no validation ran): 'best' falls back to the latest one.
    _, _, fallback = load_model_from_checkpoint(tmp_path, which="best")
    for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(fallback), strict=True):
        assert np.array_equal(a, np.asarray(b))
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "latest").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model_from_checkpoint(empty, which="best")


def test_background_save_writes_what_save_would_and_raises_its_failure_later(tmp_path, model_and_state):
    """save_in_background reads the state in its thread and writes each kind asked for, as
    `save` would; a job that fails is raised once, by the next call that waits for it."""
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path)
    read_in = []

    def host_state():
        read_in.append(threading.current_thread())
        return state

    ckpt.save_in_background(host_state, {"epoch": 1}, _info(model), kinds=("latest", "best"))
    ckpt.wait()
    assert read_in and read_in[0] is not threading.main_thread()
    for which in ("latest", "best"):
        step_dir = tmp_path / "checkpoints" / which / str(int(state.step))
        _, _, variables = load_model_from_checkpoint(step_dir, which=which)
        for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(variables), strict=True):
            assert np.array_equal(a, np.asarray(b))

    def broken():
        raise RuntimeError("the state could not be read")

    ckpt.save_in_background(broken, {"epoch": 2}, _info(model))
    with pytest.raises(RuntimeError, match="could not be read"):
        ckpt.wait()
    ckpt.wait()  # raised once: the run can still close its checkpoints
    ckpt.save_in_background(broken, {"epoch": 2}, _info(model))
    while True:  # raise_if_failed never waits: it raises once the job has ended
        try:
            ckpt.raise_if_failed()
        except RuntimeError:
            break
        time.sleep(0.01)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == [str(int(state.step))]


def test_corrupt_checkpoint_is_a_user_error(tmp_path, model_and_state):
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path)
    ckpt.save(state, {"epoch": 0}, _info(model))
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "latest" / str(int(state.step))
    for f in (step_dir / "variables").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    with pytest.raises(UserError, match=str(step_dir)):
        load_model_from_checkpoint(step_dir)
    # An incompatible target (another model's tree) on an intact checkpoint: an error naming
    # the folder, and the checkpoint is left where it is (not set aside as corrupt).
    intact = tmp_path / "intact"
    writer = Checkpoints(intact)
    writer.save(state, {"epoch": 0}, _info(model))
    writer.wait()
    other = jax.tree.map(np.zeros_like, state).replace(params={"x": np.zeros(3)})
    with pytest.raises(UserError, match=f"{intact / 'checkpoints' / 'latest'}: no intact checkpoint"):
        Checkpoints(intact).restore_latest(other)
    assert [p.name for p in (intact / "checkpoints" / "latest").iterdir()] == [str(int(state.step))]
    with pytest.raises(UserError, match="no such"):
        load_model_from_checkpoint(tmp_path / "missing")
