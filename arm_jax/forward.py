"""The model's one forward pass from uint8 images: every consumer runs the model through it.

Training and its validation (training/steps.py), `evaluate` (inference/runner.py),
GAR calibration, `predict` and `serve` (the exported program of inference/programs.py)
and the StableHLO export all call `apply_to_images`; the ONNX graph (interop/export.py)
is built from the same constants (transforms.IMAGENET_MEAN / IMAGENET_STD) in the same
order and is checked against it. So resize, grey -> RGB, normalisation and the compute
dtype are defined once, in `transforms.device_preprocess`, and an answer cannot depend
on which command asked.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from arm_jax.data.transforms import device_preprocess
from arm_jax.models import ARMResNet18, with_runtime


def apply_to_images(model: ARMResNet18, variables: dict[str, Any], images: jax.Array, *,
                    augment_keys: jax.Array | None = None, train: bool = False, **apply_kwargs):
    """`model.apply` on uint8 (N, H, W, C) images of any size, C 1 or 3.

    Resized to the model's size and normalised on the device; with `augment_keys` (N,) the
    released train transform (flip or noise, RandomErasing) is drawn from each image's key,
    none by default. `apply_kwargs` (mutable, rngs) go to flax's apply as they are.
    """
    x = device_preprocess(images, image_size=model.image_size, augment_keys=augment_keys, dtype=model.dtype)
    return model.apply(variables, x, train=train, **apply_kwargs)


def inference_fn(model: ARMResNet18) -> Callable[[dict[str, Any], jax.Array], tuple[jax.Array, jax.Array]]:
    """(variables, uint8 (N, S, S, 3)) -> (logits, probabilities) with the running GAR: what predict,
    serve and both exports compute. The weights are arguments, so one compiled program serves every
    checkpoint of an architecture (and XLA does not fold 45 MB of constants into it)."""
    model = with_runtime(model, gar_mode="running")

    def infer(variables: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = apply_to_images(model, variables, images)
        return logits, jax.nn.softmax(logits, axis=-1)

    return infer
