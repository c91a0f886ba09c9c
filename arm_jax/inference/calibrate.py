"""Estimating the running GAR from training images, for checkpoints that have none."""

from contextlib import closing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from arm_jax.data.pipeline import make_loader, read_through
from arm_jax.data.sources import decode_size_hint
from arm_jax.data.splits import open_split
from arm_jax.forward import apply_to_images
from arm_jax.inference.runner import name_model
from arm_jax.interop.model_files import LoadedModel, load_any_model, save_model


def calibrate_gar(loaded: LoadedModel, train_split, *, batch_size: int = 256, seed: int = 0,
                  max_examples: int | None = None, progress: bool = True) -> LoadedModel:
    """The model with its running GAR set to the mean representation over training images.

    The representation is the one Sharing Affinity averages (after De-albino,
    BatchNorm and the channel mean), computed as training computes it: BatchNorm
    with the statistics of batches of `batch_size` (use the training batch
    size), no augmentation, nothing updated. The mean of those batch GARs is
    what the training-time running GAR estimates. (Measured on a model trained
    here, this lands closer to the trained running value, and evaluates better,
    than the same mean taken with BatchNorm's running statistics.)
    """
    model = loaded.model
    if not model.affinity:
        return loaded

    @jax.jit
    def representation_sum(variables, images):
        # No erasing; updated statistics are discarded: calibration changes only the running GAR.
        _, state = apply_to_images(model, variables, images, train=True, rngs={"dropout": jax.random.key(seed)},
                                   mutable=["batch_stats", "gar", "intermediates"])
        return state["intermediates"]["arm"]["affinity"]["representation_sum"][0]

    limit = len(train_split) if max_examples is None else min(max_examples, len(train_split))
    batch_size = min(batch_size, limit)
    loader = make_loader(train_split, batch_size=batch_size, seed=seed, epoch=0, train=False,
                         image_size=model.image_size, shuffle_eval=True)
    total, count = 0.0, 0
    bar = tqdm(total=limit, unit="img", desc="calibrate GAR", disable=not progress)
    # Whole batches only (one compiled shape); the images are shuffled, so the few left
    # out are a random few. The loader is closed where the loop stops: at the limit, at its
    # end, or on an error (whose traceback would otherwise keep it open).
    with closing(read_through(loader)) as batches:
        for batch in batches:
            if len(batch["image"]) < batch_size or count + batch_size > limit:
                break
            total = total + np.asarray(representation_sum(loaded.variables, jnp.asarray(batch["image"])), np.float64)
            count += batch_size
            bar.update(batch_size)
    bar.close()
    flat = traverse_util.flatten_dict(jax.device_get(loaded.variables))
    flat[("gar", "arm", "affinity", "mean")] = np.asarray(total / count, np.float32)
    flat[("gar", "arm", "affinity", "count")] = np.asarray(count, np.int32)
    return LoadedModel(model, traverse_util.unflatten_dict(flat), loaded.class_names)


def calibrate_job(checkpoint: str | Path, dataset: str, data_dir: str | Path | None, output: str | Path, *,
                  batch_size: int = 256, max_examples: int | None = None, seed: int = 0,
                  skip_bad: bool = False, progress: bool = True, class_names=None,
                  model_classes: str | None = None) -> LoadedModel:
    """`arm-jax calibrate`: write a model directory whose running GAR comes from `dataset`'s train split.

    The written model carries class names: its own, else `class_names` / `model_classes`, else
    (warned) `dataset`'s order.
    """
    loaded = load_any_model(checkpoint)
    train_split = open_split(dataset, data_dir, "train", skip_bad=skip_bad,
                             image_size_hint=decode_size_hint(dataset, loaded.model.image_size))
    loaded, _ = name_model(loaded, tuple(train_split.class_names), checkpoint, dataset,
                           class_names=class_names, model_classes=model_classes)
    calibrated = calibrate_gar(loaded, train_split, batch_size=batch_size, seed=seed,
                               max_examples=max_examples, progress=progress)
    save_model(output, calibrated.variables, calibrated.model, calibrated.class_names,
               source=f"{checkpoint}, GAR calibrated on {dataset}/train ({dataset})")
    return calibrated
