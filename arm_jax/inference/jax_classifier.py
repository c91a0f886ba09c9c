"""A checkpoint as a classifier of uint8 face crops, in JAX, with a persistent compilation cache.

Kept apart from arm_jax.inference.predict so that predicting with an exported
.onnx model never imports JAX.
"""

from pathlib import Path

import jax
import numpy as np

from arm_jax.errors import UserError
from arm_jax.interop.downloads import cache_dir
from arm_jax.interop.export import class_names_of, jax_inference_fn
from arm_jax.interop.model_files import load_any_model

COMPILE_CACHE_SUBDIR = "jax-compile"


def enable_compilation_cache() -> str:
    """Cache compiled programs on disk ($ARM_JAX_CACHE/jax-compile, else ~/.cache/arm-jax/jax-compile).

    A folder already chosen (JAX_COMPILATION_CACHE_DIR, or a caller's jax.config) is kept.
    JAX reads the setting at its first compilation, so this runs before anything compiles.
    """
    if not jax.config.jax_compilation_cache_dir:
        directory = cache_dir() / COMPILE_CACHE_SUBDIR
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
    return jax.config.jax_compilation_cache_dir


class JaxClassifier:
    """load_any_model + the running GAR; `probabilities` takes uint8 (N, S, S, 3) at the model's size."""

    def __init__(self, checkpoint: str | Path):
        enable_compilation_cache()
        loaded = load_any_model(checkpoint)
        if not loaded.gar_calibrated:
            raise UserError(f"{checkpoint}: has no running GAR, so a prediction would depend on the other images; "
                            "run `arm-jax calibrate` on it first")
        self.class_names = class_names_of(loaded)
        self.image_size = loaded.model.image_size
        self._infer = jax.jit(jax_inference_fn(loaded))

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        """(N, classes) float32. Batches are padded to a power of two so that few shapes ever compile."""
        count = len(faces)
        padded = 1 << max(count - 1, 0).bit_length()
        if padded > count:  # blank images: with the running GAR they change nobody's answer
            faces = np.concatenate([faces, np.zeros((padded - count,) + faces.shape[1:], faces.dtype)])
        _, probabilities = self._infer(faces)
        return np.asarray(probabilities)[:count]
