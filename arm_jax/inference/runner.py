"""Running a loaded model over batches: logits on the device, from uint8 batches."""

from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.data.sources import decode_size_hint
from arm_jax.data.splits import open_split
from arm_jax.interop.model_files import LoadedModel, load_any_model
from arm_jax.models import ARMResNet18
from arm_jax.data.transforms import preprocess_batch


def make_logits_fn(model: ARMResNet18):
    """jit-compiled (variables, uint8 images) -> float32 logits; nothing mutable."""

    @jax.jit
    def logits_fn(variables: dict[str, Any], images: jax.Array) -> jax.Array:
        x = preprocess_batch({"image": images}, image_size=model.image_size, dtype=model.dtype)  # no erasing
        return model.apply(variables, x, train=False)

    return logits_fn


def batched_logits(loaded: LoadedModel, model: ARMResNet18, batches: Iterable[dict],
                   pad_to: int | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """(batch, logits) for each batch of {'image': uint8 (B, H, W, C), ...}.

    `pad_to` pads a short last batch with blank images so that one compiled
    shape serves every batch; only allowed where examples do not see each
    other (the running GAR), since padding would change a batch GAR.
    """
    if pad_to is not None and model.affinity and model.gar_mode == "batch":
        raise ValueError("padding would change the batch GAR")
    logits_fn = make_logits_fn(model)
    for batch in batches:
        images = batch["image"]
        count = len(images)
        if pad_to is not None and count < pad_to:
            images = np.concatenate([images, np.zeros((pad_to - count,) + images.shape[1:], images.dtype)])
        yield batch, np.asarray(logits_fn(loaded.variables, jnp.asarray(images)))[:count]


def model_and_split(checkpoint, dataset: str, data_dir, split: str, *, skip_bad: bool = False):
    """(LoadedModel named after the split's classes, the split opened for that model's input size)."""
    loaded = load_any_model(checkpoint)
    opened = open_split(dataset, data_dir, split, skip_bad=skip_bad,
                        image_size_hint=decode_size_hint(dataset, loaded.model.image_size))
    return loaded.named(tuple(opened.class_names), f"{checkpoint} on {dataset}/{split}"), opened
