"""`arm-jax predict`: the expression in aligned face crops, one answer per image file."""

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from arm_jax.data.transforms import resize_uint8
from arm_jax.errors import UserError
from arm_jax.inference.runner import make_logits_fn
from arm_jax.interop.model_files import load_any_model
from arm_jax.models import with_runtime

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Prediction:
    """The predicted class of one image file and the probability of every class."""

    path: str
    label: int
    class_name: str
    probabilities: dict[str, float]


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The files named, and the image files inside folders named (sorted), in order."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return files


def read_face(path: Path, image_size: int) -> np.ndarray:
    """An image file as uint8 RGB at the model's input size (gray is replicated to 3 channels)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    return resize_uint8(array, image_size)


def predict(checkpoint: str | Path, inputs: list[str | Path], *, batch_size: int = 32) -> list[Prediction]:
    """Predict every image; with the running GAR, an image's answer does not depend on the others."""
    loaded = load_any_model(checkpoint)
    if not loaded.gar_calibrated:
        raise UserError(f"{checkpoint}: has no running GAR, so a prediction would depend on the other images; "
                        "run `arm-jax calibrate` on it first")
    model = with_runtime(loaded.model, gar_mode="running")
    names = loaded.class_names or tuple(f"class_{i}" for i in range(model.num_classes))
    files = image_files(inputs)
    logits_fn = make_logits_fn(model)
    results = []
    for start in range(0, len(files), batch_size):
        faces = np.stack([read_face(path, model.image_size) for path in files[start : start + batch_size]])
        logits = logits_fn(loaded.variables, faces)
        probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
        for path, row in zip(files[start : start + batch_size], probabilities):
            label = int(row.argmax())
            results.append(Prediction(str(path), label, names[label], {n: float(p) for n, p in zip(names, row)}))
    return results
