"""Running a loaded model over batches (logits on the device, from uint8 batches); naming its classes."""

import logging
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.data.classes import given_class_names
from arm_jax.errors import UserError
from arm_jax.forward import apply_to_images
from arm_jax.interop.model_files import LoadedModel
from arm_jax.models import ARMResNet18

log = logging.getLogger(__name__)


def make_logits_fn(model: ARMResNet18):
    """jit-compiled (variables, uint8 images) -> float32 logits; nothing mutable, no erasing."""
    return jax.jit(lambda variables, images: apply_to_images(model, variables, images))


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


def name_model(loaded: LoadedModel, split_class_names: tuple[str, ...], checkpoint, dataset: str, *,
               class_names=None, model_classes: str | None = None) -> tuple[LoadedModel, list[str]]:
    """The model with class names, and a note (also logged) when they had to be assumed.

    A model without names takes them from `class_names` / `model_classes` (a data set whose
    order it was trained in), else assumes `dataset`'s order, with a warning saying so.
    """
    given = given_class_names(class_names, model_classes)
    if given is not None:
        if loaded.class_names is not None and given != loaded.class_names:
            raise UserError(f"{checkpoint}: carries its class names ({', '.join(loaded.class_names)}); "
                            "--class-names / --model-classes only name a model without them")
        return loaded.named(given, str(checkpoint)), []
    if loaded.class_names is not None:
        return loaded, []
    if loaded.model.num_classes != len(split_class_names):
        raise UserError(f"{checkpoint}: carries no class names and predicts {loaded.model.num_classes} "
                        f"classes, {dataset} has {len(split_class_names)}; say which they are with "
                        "--model-classes DATASET or --class-names a,b,...")
    note = (f"{checkpoint} carries no class names: assuming {dataset}'s order "
            f"({', '.join(split_class_names)}). If it was trained on another data set, say "
            "which with --model-classes DATASET or --class-names a,b,...")
    log.warning("%s", note)
    return loaded.named(tuple(split_class_names), str(checkpoint)), [note]
