"""`arm-jax export` against the JAX model, and `arm-jax predict` on the exported ONNX model without JAX."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from PIL import Image

from arm_jax.errors import UserError
from arm_jax.inference.predict import predict
from arm_jax.interop.export import export_model
from cli.main import cli
from tests.fixtures import write_image
from tests.small_models import EXPRESSIONS, write_small_model

SIZE = 96  # a 3x3 representation: the classes' probabilities differ from image to image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model directory, its ONNX export, 8 face-sized photos cut from scikit-image's real photos)."""
    from skimage import data

    root = tmp_path_factory.mktemp("export")
    model_dir = write_small_model(root / "model", image_size=SIZE)
    result = CliRunner().invoke(cli, ["export", str(model_dir), str(root / "arm.onnx"), "--stablehlo"])
    assert result.exit_code == 0, result.output
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    faces = []
    for index in range(8):  # different crops of real photos, at the model's size
        photo = photos[index % 4]
        top, left = 40 * (index // 4), 60 * (index // 4)
        faces.append(write_image(root / "faces" / f"face{index}.png", np.ascontiguousarray(
            photo[top : top + 256 : 256 // SIZE, left : left + 256 : 256 // SIZE][:SIZE, :SIZE])))
    return model_dir, root / "arm.onnx", faces


def onnx_probabilities(path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images})[0]


def test_onnx_equals_predict_for_batch_1_and_8(exported):
    model_dir, onnx_path, faces = exported
    from_jax = np.array([[p.probabilities[n] for n in EXPRESSIONS] for p in predict(model_dir, faces, batch_size=8)])
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in faces])
    batch_of_8 = onnx_probabilities(onnx_path, images)
    one_by_one = np.concatenate([onnx_probabilities(onnx_path, images[i : i + 1]) for i in range(8)])
    assert np.abs(batch_of_8 - from_jax).max() <= 1e-4
    assert np.abs(one_by_one - from_jax).max() <= 1e-4
    assert np.abs(one_by_one - batch_of_8).max() <= 1e-6  # the running GAR: no image sees another
    assert np.ptp(from_jax.argmax(axis=1)) > 0 or np.ptp(from_jax[:, 0]) > 1e-3  # the images are told apart
    # `predict` on the .onnx file is the same function as on the checkpoint.
    from_onnx = predict(onnx_path, faces, batch_size=3)
    assert [p.class_name for p in from_onnx] == [EXPRESSIONS[i] for i in from_jax.argmax(axis=1)]
    assert np.abs(np.array([[p.probabilities[n] for n in EXPRESSIONS] for p in from_onnx]) - from_jax).max() <= 1e-4


def test_exported_model_is_valid_and_carries_class_names(exported):
    _, onnx_path, _ = exported
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert tuple(json.loads(metadata["class_names"])) == EXPRESSIONS
    assert metadata["image_size"] == str(SIZE)
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]


def test_stablehlo_export_matches_onnx(exported):
    import jax

    _, onnx_path, _ = exported
    restored = jax.export.deserialize(onnx_path.with_suffix(".stablehlo").read_bytes())
    # Lowered for every platform, not only the exporting machine's: each compiles its own forms.
    assert restored.platforms == ("cpu", "cuda", "rocm", "tpu")
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    _, probabilities = restored.call(images)
    assert np.abs(np.asarray(probabilities) - onnx_probabilities(onnx_path, images)).max() <= 1e-4


def test_predict_on_onnx_never_imports_jax(exported):
    _, onnx_path, faces = exported
    program = ("import sys, json; from cli.main import cli\n"
               f"cli(['predict', '--checkpoint', {str(onnx_path)!r}, {str(faces[0])!r}, '--json', '-'],"
               " standalone_mode=False)\n"
               "print(json.dumps(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *answer, loaded = done.stdout.strip().splitlines()
    assert json.loads(loaded) == []
    assert json.loads("\n".join(answer))[0]["class_name"] in EXPRESSIONS


def test_export_refuses_a_model_without_running_gar(tmp_path):
    model_dir = write_small_model(tmp_path / "model", image_size=64, calibrated=False)
    with pytest.raises(UserError, match="calibrate"):
        export_model(model_dir, tmp_path / "out.onnx")
    with pytest.raises(UserError, match=r"\.onnx"):
        export_model(model_dir, tmp_path / "out.onx")


def test_checkpoint_predictions_use_the_persistent_compilation_cache(tmp_path):
    """Without a cache chosen, predict's JAX path caches compiled programs in $ARM_JAX_CACHE/jax-compile."""
    import os

    chosen = tmp_path / "chosen"
    program = ("import jax; from arm_jax.inference.jax_classifier import enable_compilation_cache\n"
               "print(enable_compilation_cache(), jax.config.jax_compilation_cache_dir)\n"
               f"jax.config.update('jax_compilation_cache_dir', {str(chosen)!r})\n"  # a folder the user chose wins
               "print(enable_compilation_cache(), jax.config.jax_compilation_cache_dir)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["ARM_JAX_CACHE"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "jax-compile")] * 2 + [str(chosen)] * 2
    assert (tmp_path / "jax-compile").is_dir()
