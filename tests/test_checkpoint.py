"""Checkpoints: exact round trip (arrays and optax state types), background saves, model rebuild,
which step is kept and restored (latest, best, a corrupt newest, an earlier layout), bad files."""

import json
import re
import threading
import time

import jax
import numpy as np
import optax
import pytest

from arm_jax.errors import UserError
from arm_jax.training.checkpoints import Checkpoints, Progress, load_model_from_checkpoint, read_model_info
from arm_jax.training.config import TrainConfig
from arm_jax.models import ARMResNet18, architecture
from arm_jax.training.optim import make_optimizer
from arm_jax.training.state import TrainState

KEY = (0, 7)  # a step key's data, as Progress stores it


@pytest.fixture(scope="module")
def model_and_state():
    """ARMResNet18's full training state with every leaf distinctive (random floats, counts of 3),
    as after training. Drawn in numpy for the shapes jax.eval_shape gives: a compiled init spent
    ~25 s of CPU (mostly compiling its threefry draws) on values replaced here anyway."""
    model = ARMResNet18(num_classes=7, image_size=96)
    return model, _distinctive_state(model, seed=0)


def _distinctive_state(model: ARMResNet18, seed: int) -> TrainState:
    """A training state of `model` with random float leaves and counts of 3, drawn in numpy."""
    tx = make_optimizer(TrainConfig(), steps_per_epoch=5)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), np.float32)
    shapes = jax.eval_shape(lambda x: TrainState.create(model.init(jax.random.key(0), x, train=False), tx), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype) if np.issubdtype(a.dtype, np.floating)
                        else np.full(a.shape, 3, a.dtype), shapes)


def _info(model):
    return {"architecture": architecture(model), "class_names": list("abcdefg"),
            "dataset": "synthetic", "image_size": 96}


def test_round_trip_is_exact_and_keeps_optax_types(tmp_path, model_and_state):
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path, keep=2)
    progress = Progress(step_key=(1, 2), epoch=1, batches_done=2, data_loader={"first_epoch": 1, "last_epoch": 3},
                        sums={"count": 8})
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
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model_from_checkpoint(empty, which="best")


def test_background_save_writes_what_save_would_and_raises_its_failure_later(tmp_path, model_and_state):
    """save_in_background reads the state in its thread and writes the checkpoint (here a new best)
    as `save` would; a job that fails is raised once, by the next call that waits for it."""
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path)
    read_in = []

    def host_state():
        read_in.append(threading.current_thread())
        return state

    ckpt.save_in_background(host_state, Progress(KEY, epoch=1, best_wa=0.5), _info(model), best=True)
    ckpt.wait()
    assert read_in and read_in[0] is not threading.main_thread()
    assert ckpt.best_step() == ckpt.latest_step() == int(state.step)
    for which in ("latest", "best"):
        _, _, variables = load_model_from_checkpoint(tmp_path, which=which)
        for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(variables), strict=True):
            assert np.array_equal(a, np.asarray(b))

    def broken():
        raise RuntimeError("the state could not be read")

    ckpt.save_in_background(broken, Progress(KEY, epoch=2), _info(model))
    with pytest.raises(RuntimeError, match="could not be read"):
        ckpt.wait()
    ckpt.wait()  # raised once: the run can still close its checkpoints
    ckpt.save_in_background(broken, Progress(KEY, epoch=2), _info(model))
    while True:  # raise_if_failed never waits: it raises once the job has ended
        try:
            ckpt.raise_if_failed()
        except RuntimeError:
            break
        time.sleep(0.01)
    ckpt.close()
    assert _kept(tmp_path) == [str(int(state.step))]


def test_corrupt_checkpoint_is_a_user_error(tmp_path, model_and_state):
    model, state = model_and_state
    ckpt = Checkpoints(tmp_path)
    ckpt.save(state, Progress(KEY, epoch=0), _info(model))
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / str(int(state.step))
    for f in (step_dir / "variables").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    with pytest.raises(UserError, match=str(step_dir)):
        load_model_from_checkpoint(step_dir)
    # An incompatible target (another model's tree) on an intact checkpoint: an error naming
    # the folder, and the checkpoint is left where it is (not set aside as corrupt).
    intact = tmp_path / "intact"
    writer = Checkpoints(intact)
    writer.save(state, Progress(KEY, epoch=0), _info(model))
    writer.wait()
    other = jax.tree.map(np.zeros_like, state).replace(params={"x": np.zeros(3)})
    with pytest.raises(UserError, match=f"{intact / 'checkpoints'}: no intact checkpoint"):
        Checkpoints(intact).restore_latest(other)
    assert _kept(intact) == [str(int(state.step))]
    with pytest.raises(UserError, match="no such"):
        load_model_from_checkpoint(tmp_path / "missing")


def _small_state(step: int) -> TrainState:
    """A small TrainState at `step` whose every float leaf holds the step number."""
    tx = make_optimizer(TrainConfig(), steps_per_epoch=5)
    variables = {"params": {"fc": {"kernel": np.full((2, 3), step, np.float32)}},
                 "batch_stats": {"bn": {"mean": np.full(3, step, np.float32)}},
                 "gar": {"mean": np.full(3, step, np.float32)}}
    state = TrainState.create(variables, tx)
    return jax.tree.map(lambda a: np.full(np.shape(a), step, np.asarray(a).dtype), state)


SMALL_INFO = {"architecture": {}, "class_names": ["a", "b"], "dataset": "synthetic", "image_size": 16}


def _save_steps(workdir, steps, best, keep=2):
    """Save _small_state(s) for each of `steps` as the loop does (from its thread), as a new best
    (validation WA step / 10) for the steps in `best`."""
    ckpt = Checkpoints(workdir, keep=keep)
    for step in steps:
        progress = Progress(KEY, epoch=step, best_wa=step / 10 if step in best else None)
        ckpt.save_in_background(lambda step=step: _small_state(step), progress, SMALL_INFO, best=step in best)
    ckpt.close()


def _kept(workdir) -> list[str]:
    """The step directories (and set-aside ones) in the checkpoints folder."""
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name[0].isdigit())


def test_orbax_keeps_the_newest_and_the_last_one_saved_as_best(tmp_path):
    """keep=2: orbax's policies keep the two newest steps and the last one saved as best (however
    old); a resume restores the newest; 'best' and 'latest' name those steps."""
    _save_steps(tmp_path, steps=range(1, 6), best=(2, 3))
    assert _kept(tmp_path) == ["3", "4", "5"] and Checkpoints(tmp_path).best_step() == 3
    restored, progress = Checkpoints(tmp_path).restore_latest(_small_state(0))
    assert progress == Progress(KEY, epoch=5)
    assert all(np.all(leaf == 5) for leaf in jax.tree.leaves(restored))
    assert read_model_info(tmp_path, which="best")[1] == 3
    assert read_model_info(tmp_path, which="latest")[1] == 5
    assert read_model_info(tmp_path / "checkpoints" / "4", which="latest")[1] == 4
    _save_steps(tmp_path, steps=range(6, 8), best=())  # reopened: orbax still knows which step is the best
    assert _kept(tmp_path) == ["3", "6", "7"] and read_model_info(tmp_path, which="best")[1] == 3


def test_a_corrupt_newest_checkpoint_is_skipped_and_set_aside(tmp_path):
    """The newest step's arrays are garbage: a resume restores the step before and sets the corrupt
    one aside (it was the best: reading 'best' then falls back to the newest intact step)."""
    _save_steps(tmp_path, steps=range(1, 4), best=(3,), keep=3)
    for f in (tmp_path / "checkpoints" / "3" / "variables").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    restored, progress = Checkpoints(tmp_path).restore_latest(_small_state(0))
    assert progress == Progress(KEY, epoch=2) and all(np.all(leaf == 2) for leaf in jax.tree.leaves(restored))
    assert _kept(tmp_path) == ["1", "2", "3.corrupt"]
    assert read_model_info(tmp_path, which="best")[1] == 2


def test_checkpoints_of_an_earlier_layout_are_read_but_not_resumed(tmp_path):
    """arm-jax 0.1 before one manager wrote checkpoints/latest/<step> and checkpoints/best/<step>:
    evaluate, predict and serve read them ('best' first); training refuses them by name and
    changes nothing."""
    _save_steps(tmp_path, steps=range(1, 4), best=(2,), keep=3)
    root = tmp_path / "checkpoints"
    for kind, steps in (("latest", ("1", "3")), ("best", ("2",))):
        (root / kind).mkdir()
        for step in steps:
            (root / step).rename(root / kind / step)
    assert read_model_info(tmp_path, which="best")[1] == 2 and read_model_info(tmp_path, which="latest")[1] == 3
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(UserError, match=re.escape(f"{root / 'latest'}: checkpoints in the layout of an earlier "
                                                  "arm-jax 0.1")):
        Checkpoints(tmp_path)
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_a_model_without_sharing_affinity_loads_from_its_checkpoint(tmp_path, monkeypatch):
    """Training saves every collection, so a --no-affinity model's checkpoint holds an empty
    'gar' that its init lacks: both readers (tensorstore's direct read and orbax's, the
    fallback for layouts the direct read does not know) must restore it."""
    from arm_jax.training import checkpoint_reading

    model = ARMResNet18(num_classes=7, image_size=64, affinity=False)
    state = _distinctive_state(model, seed=1).replace(gar={})  # as training's variables: every collection, the GAR's empty
    ckpt = Checkpoints(tmp_path)
    assert ckpt.save(state, Progress(KEY, epoch=1),
                     {**_info(model), "image_size": 64})
    ckpt.wait()
    want = jax.tree.leaves(state.params)
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(checkpoint_reading, "read_variables", lambda item, abstract: None)
        arch, _, variables = load_model_from_checkpoint(tmp_path, which="latest")
        assert ARMResNet18(**arch) == model
        for a, b in zip(want, jax.tree.leaves(variables["params"]), strict=True):
            assert np.array_equal(a, np.asarray(b)), direct


def _edit_progress(step_dir, edit) -> None:
    """Rewrite a checkpoint's 'progress' JSON (orbax's JsonCheckpointHandler file) through `edit(dict)`."""
    path = step_dir / "progress" / "metadata"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format=1), "progress format 1"),
    (lambda d: d.update(lr_scale=0.5), "unknown fields: ['lr_scale']"),
    (lambda d: d.pop("sums"), "missing: ['sums']"),
], ids=["another-format", "an-unknown-field", "a-missing-field"])
def test_a_progress_of_another_format_is_refused_by_name_and_nothing_is_set_aside(tmp_path, edit, message):
    _save_steps(tmp_path, steps=range(1, 3), best=())
    newest = tmp_path / "checkpoints" / "2"
    _edit_progress(newest, edit)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        Checkpoints(tmp_path).restore_latest(_small_state(0))
    assert str(newest) in str(error.value)
    assert _kept(tmp_path) == ["1", "2"]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # slow: grain worker processes
def test_each_process_saves_and_resumes_its_own_share_of_the_data(tmp_path, monkeypatch, workers):
    """A mid-epoch checkpoint's 'data' item (grain's orbax handler) holds one state file per process:
    each of two processes (shards) of a loader, saved 3 batches in and restored into a fresh loader,
    goes on with its own next batches (the state taken at the save, not when orbax writes); the
    other process's file is not its own."""
    from arm_jax.data.pipeline import make_loader
    from tests.test_pipeline import TinySplit, _same

    def loader(shard):
        return iter(make_loader(TinySplit(n=64), batch_size=4, seed=1, train=True, image_size=16, epochs=(0, 2),
                                shard_index=shard, shard_count=2, worker_count=workers))

    # The process grain's handler names its file after (jax.process_index() there; patching JAX's
    # own would also make orbax wait for a second process).
    from grain._src.core import sharding

    for shard in (0, 1):  # each process in a workdir of its own: one process here cannot save a step twice
        monkeypatch.setattr(sharding, "get_process_index_and_count", lambda shard=shard: (shard, 2))
        ckpt, iterator = Checkpoints(tmp_path / str(shard)), loader(shard)
        for _ in range(3):
            next(iterator)
        ckpt.save(_small_state(3), Progress(KEY, batches_done=3), SMALL_INFO, data_state=iterator.get_state())
        expected = [next(iterator) for _ in range(4)]  # read on while orbax writes
        ckpt.close()
        saved = tmp_path / str(shard) / "checkpoints" / "3" / "data"
        assert sorted(p.name for p in saved.glob("*.json")) == [f"process_{shard}-of-2.json"]
        reader = Checkpoints(tmp_path / str(shard))
        reader.restore_latest(_small_state(0))
        resumed = loader(shard)
        reader.restore_data(resumed)
        _same([next(resumed) for _ in range(4)], expected)
        monkeypatch.setattr(sharding, "get_process_index_and_count", lambda shard=shard: (1 - shard, 2))
        with pytest.raises(ValueError, match=f"process_{1 - shard}-of-2.json does not exist"):
            reader.restore_data(loader(1 - shard))
        reader.close()


def test_the_library_changes_no_logger_and_the_command_filters_orbax_reports(tmp_path):
    """Importing the module and opening, saving with and closing Checkpoints leave absl's logger
    (orbax's) as it was; the `arm-jax` command's logging setup puts the no-space filter on it, once."""
    import subprocess
    import sys

    script = ("import logging, numpy as np\n"
              "from arm_jax.training.checkpoints import Checkpoints, Progress\n"
              "from arm_jax.training.state import TrainState\n"
              "absl = logging.getLogger('absl'); before = list(absl.filters)\n"
              f"c = Checkpoints({str(tmp_path)!r})\n"
              "c.save(TrainState(step=np.int32(1), params={'w': np.ones(2)}, batch_stats={}, gar={}, opt_state=()), "
              "Progress((0, 0)), {})\n"
              "c.close(); assert absl.filters == before, absl.filters\n"
              "from cli.train import _log_to_stderr\n"
              "_log_to_stderr(); _log_to_stderr()\n"
              "print([type(f).__name__ for f in absl.filters])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['OrbaxReportFilter']"
