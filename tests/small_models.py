"""Small random ARM models for the export, predict and face-detection tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


EXPRESSIONS = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def small_model(image_size: int = 64, seed: int = 0, calibrated: bool = True):
    """A random ARM model with random BatchNorm and GAR state, as a LoadedModel named after EXPRESSIONS.

    Values are drawn in numpy for the shapes jax.eval_shape gives (no compiled init: seconds faster),
    kernels at He scale; the classifier is then scaled so that logits spread by about 3 (measured on
    random images with onnxruntime), so that probabilities are neither uniform nor saturated.
    """
    import jax
    import onnxruntime

    from arm_jax.interop.convert import expected_shapes
    from arm_jax.interop.export import build_onnx
    from arm_jax.interop.model_files import LoadedModel
    from arm_jax.models import ARMResNet18

    model = ARMResNet18(num_classes=len(EXPRESSIONS), image_size=image_size)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "'kernel'" in name:  # HWIO or (in, out): fan-in is all but the last axis
            return rng.normal(0, np.sqrt(2 / max(1, int(np.prod(shape.shape[:-1])))), shape.shape)
        if "'scale'" in name or "'alpha'" in name or "'var'" in name:
            return 0.5 + rng.random(shape.shape)
        if "'count'" in name:
            return np.asarray(5 if calibrated else 0, shape.dtype)
        return rng.normal(0, 0.2 if "'mean'" in name or "'bias'" in name else 1.0, shape.shape)

    variables = jax.tree_util.tree_map_with_path(
        lambda path, shape: np.asarray(draw(path, shape), shape.dtype), expected_shapes(model))
    loaded = LoadedModel(model, variables, EXPRESSIONS)
    if calibrated:
        session = onnxruntime.InferenceSession(build_onnx(loaded).SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        images = rng.integers(0, 256, (8, image_size, image_size, 3), dtype=np.uint8)
        logits = session.run(["logits"], {"image": images})[0] - variables["params"]["fc"]["bias"]
        variables["params"]["fc"]["kernel"] *= np.float32(3 / max(float(logits.std()), 1e-6))
    return loaded


def write_small_model(directory: Path, image_size: int = 64, seed: int = 0, calibrated: bool = True) -> Path:
    """`small_model` saved as a model directory (`arm-jax convert`'s format)."""
    from arm_jax.interop.model_files import save_model

    loaded = small_model(image_size, seed, calibrated)
    return save_model(directory, loaded.variables, loaded.model, loaded.class_names)
