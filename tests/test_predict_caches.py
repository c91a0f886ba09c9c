"""`predict`'s caches answer what the plain paths answer, and never answer from a stale entry.

The JAX path: a program exported per architecture (weights as arguments) and its executables
(arm_jax.inference.programs), a workdir read without orbax (arm_jax.training.checkpoint_reading).
The ONNX path: onnxruntime's optimised graph kept in the cache (arm_jax.inference.onnx_session).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime
import pytest

import arm_jax
from arm_jax.inference import jax_classifier, onnx_session, programs
from arm_jax.inference.jax_classifier import JaxClassifier
from arm_jax.forward import inference_fn
from arm_jax.interop.export import build_onnx, jax_inference_fn
from arm_jax.training.checkpoint_reading import load_model_from_checkpoint, read_variables
from tests.fixtures import write_image
from tests.serving import write_workdir
from tests.small_models import small_model

SIZE = 64


@pytest.fixture
def program_dir(tmp_path, monkeypatch):
    """JaxClassifier's program cache in a folder of this test (JAX's own cache stays the session's)."""
    monkeypatch.setattr(jax_classifier, "enable_compilation_cache", lambda: str(tmp_path / "jax-cache"))
    return tmp_path / "jax-cache" / programs.PROGRAM_CACHE_SUBDIR


def faces(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def plain_jit(loaded, images: np.ndarray) -> np.ndarray:
    """The probabilities of jax.jit(inference_fn) on the batch padded to a power of two, as JaxClassifier pads."""
    padded = 1 << max(len(images) - 1, 0).bit_length()
    batch = np.concatenate([images, np.zeros((padded - len(images),) + images.shape[1:], np.uint8)])
    return np.asarray(jax.jit(inference_fn(loaded.model))(loaded.variables, batch)[1])[: len(images)]


def test_a_workdir_answers_as_the_plain_jit_first_and_from_the_cache(tmp_path, program_dir):
    loaded = small_model(SIZE, seed=1)
    workdir = write_workdir(tmp_path / "run", loaded, step=3)
    images = faces(3)
    expected = plain_jit(loaded, images)
    first = JaxClassifier(workdir).probabilities(images)  # exports, compiles, stores
    stored = sorted(p.suffix for p in program_dir.iterdir())
    assert stored == [".executable", ".jaxexport"]  # one program, one executable (batch 4)
    second = JaxClassifier(workdir).probabilities(images)  # both from the cache
    assert np.array_equal(first, second)
    assert np.abs(first - expected).max() <= 1e-6
    # Today's answers came from the weights compiled in as constants: the same to float32 rounding.
    constants = np.asarray(jax.jit(jax_inference_fn(loaded))(np.concatenate([images, np.zeros_like(images[:1])]))[1])[:3]
    assert np.abs(second - constants).max() <= 1e-6
    assert np.abs(second - plain_jit(small_model(SIZE, seed=2), images)).max() > 1e-3  # the bound can fail


def test_a_changed_checkpoint_is_answered_with_its_own_weights(tmp_path, program_dir):
    """A retrained checkpoint shares the program: the weights are arguments."""
    images = faces(2, seed=3)
    workdir = write_workdir(tmp_path / "run", small_model(SIZE, seed=1), step=1)
    before = JaxClassifier(workdir).probabilities(images)
    retrained = small_model(SIZE, seed=2)
    shutil.rmtree(workdir)
    write_workdir(workdir, retrained, step=2)
    after = JaxClassifier(workdir).probabilities(images)
    assert np.abs(after - plain_jit(retrained, images)).max() <= 1e-6
    assert np.abs(after - before).max() > 1e-3
    assert len(list(program_dir.glob("*.jaxexport"))) == 1


@pytest.mark.slow  # fast tier: a second architecture's export and compilation
def test_another_architecture_gets_its_own_program(tmp_path, program_dir):
    workdir = write_workdir(tmp_path / "run", small_model(SIZE, seed=1), step=1)
    JaxClassifier(workdir).probabilities(faces(1))
    larger = small_model(96, seed=1)
    shutil.rmtree(workdir)
    write_workdir(workdir, larger, step=3)
    classifier = JaxClassifier(workdir)
    big = np.random.default_rng(4).integers(0, 256, (1, 96, 96, 3), np.uint8)
    assert classifier.image_size == 96
    assert np.abs(classifier.probabilities(big) - plain_jit(larger, big)).max() <= 1e-6
    assert len(list(program_dir.glob("*.jaxexport"))) == 2


@pytest.mark.slow
def test_damaged_cache_entries_are_rebuilt(tmp_path, program_dir):
    loaded = small_model(SIZE, seed=1)
    workdir = write_workdir(tmp_path / "run", loaded, step=1)
    images = faces(1)
    first = JaxClassifier(workdir).probabilities(images)
    for entry in program_dir.iterdir():
        entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    assert np.array_equal(JaxClassifier(workdir).probabilities(images), first)
    assert np.array_equal(JaxClassifier(workdir).probabilities(images), first)  # rewritten entries load


@pytest.mark.slow  # fast tier: three batch sizes compiled (test_serve.py's JAX server warms up too)
def test_batches_are_answered_while_larger_sizes_warm_up(tmp_path, program_dir):
    """The server's warm-up: a batch whose size is not ready yet runs in slices of a ready size."""
    loaded = small_model(SIZE, seed=1)
    classifier = JaxClassifier(write_workdir(tmp_path / "run", loaded, step=1))
    images = faces(3, seed=5)
    classifier.probabilities(images[:1])
    warm = classifier.warm_in_background([2, 4])
    during = classifier.probabilities(images)  # in slices or at 4, whichever is ready
    warm.join()
    assert sorted(classifier._compiled) == [1, 2, 4] and not classifier._warming
    assert np.abs(during - plain_jit(loaded, images)).max() <= 1e-6
    assert np.abs(classifier.probabilities(images) - during).max() <= 1e-6


def test_the_program_key_follows_the_model_source(tmp_path):
    package = tmp_path / "arm_jax"
    source = Path(arm_jax.__file__).parent
    for pattern in programs.PROGRAM_SOURCES:
        for path in source.glob(pattern):
            (package / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, package / path.relative_to(source))
    before = programs.source_digest(package)
    assert before == programs.source_digest(source)
    with open(package / "models" / "arm.py", "a") as file:
        file.write("\n# an edit\n")
    assert programs.source_digest(package) != before


def test_checkpoint_arrays_read_directly_equal_orbax_restore(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    loaded = small_model(SIZE, seed=1)
    workdir = write_workdir(tmp_path / "run", loaded, step=4)
    item = workdir / "checkpoints" / "4" / "variables"
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), loaded.variables)
    with ocp.StandardCheckpointer() as checkpointer:
        by_orbax = checkpointer.restore(item, target)
    direct = read_variables(item, target)
    assert jax.tree.structure(direct) == jax.tree.structure(by_orbax)
    for ours, theirs in zip(jax.tree.leaves(direct), jax.tree.leaves(by_orbax)):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    wrong = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape + (1,), a.dtype), target)
    with pytest.raises(ValueError, match="shape"):
        read_variables(item, wrong)
    # A layout it does not know is orbax's to read, with the same arrays.
    monkeypatch.setattr("arm_jax.training.checkpoint_reading.read_variables", lambda item, abstract: None)
    _, _, through_orbax = load_model_from_checkpoint(workdir, shapes_for=lambda fields: target)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(through_orbax), jax.tree.leaves(direct)))


@pytest.mark.slow  # fast tier: two predict processes
def test_a_second_predict_on_a_workdir_imports_neither_flax_orbax_nor_scipy(tmp_path):
    workdir = write_workdir(tmp_path / "run", small_model(SIZE, seed=1), step=1)
    face = write_image(tmp_path / "face.png", faces(1)[0])
    program = ("import sys, json; from cli.main import cli\n"
               f"cli(['predict', '--checkpoint', {str(workdir)!r}, {str(face)!r}, '--json', '-'],"
               " standalone_mode=False)\n"
               "print(json.dumps(sorted(m for m in ('flax', 'orbax', 'optax', 'scipy', 'cv2') if m in sys.modules)))")
    answers = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        *answer, modules = done.stdout.strip().splitlines()
        answers.append(json.loads("\n".join(answer)))
    assert json.loads(modules) == []
    assert answers[0] == answers[1]


def test_onnx_sessions_from_the_optimised_graph_answer_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("ARM_JAX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "arm.onnx"
    onnx.save_model(build_onnx(small_model(SIZE, seed=1)), path)
    images = faces(4, seed=6)

    def plain() -> np.ndarray:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"image": images})[0]

    first = onnx_session.session(path).run(["probabilities"], {"image": images})[0]  # optimises, saves
    assert [p.suffix for p in (tmp_path / "cache" / onnx_session.OPTIMIZED_SUBDIR).iterdir()] == [".onnx"]
    second = onnx_session.session(path).run(["probabilities"], {"image": images})[0]  # from the saved graph
    assert np.array_equal(first, plain()) and np.array_equal(second, plain())
    onnx.save_model(build_onnx(small_model(SIZE, seed=2)), path)  # another model under the same name
    other = onnx_session.session(path).run(["probabilities"], {"image": images})[0]
    assert np.array_equal(other, plain()) and np.abs(other - first).max() > 1e-3
