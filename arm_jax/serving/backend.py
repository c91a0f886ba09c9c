"""The served model: a classifier opened as `predict` opens it, its description and its warm-up."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arm_jax.inference.predict import Classifier, OnnxClassifier, open_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """The classifier, what GET /v1/model says about it, and how long it took to get ready."""

    classifier: Classifier
    info: dict
    load_s: float
    warm_up_s: float


def checkpoint_step(path: Path) -> int | None:
    """The training step of a workdir's checkpoint (the one `predict` loads: best, else latest).

    None for an .onnx file, a model directory or a PyTorch file: they do not record one.
    """
    if path.suffix.lower() == ".onnx" or not path.is_dir():
        return None
    from arm_jax.interop.model_files import MODEL_FILE  # imports JAX: only on the JAX path
    from arm_jax.training.checkpoint_reading import read_model_info

    if (path / MODEL_FILE).is_file():
        return None
    return read_model_info(path)[1]


def warm_up_sizes(backend: str, max_batch: int) -> list[int]:
    """The batch sizes the classifier will run: JaxClassifier pads a batch to a power of two,
    each power up to max_batch is one executable; onnxruntime compiles nothing per shape."""
    if backend == "onnxruntime":
        return [1]
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(2 * sizes[-1])
    return sizes


def open_model(path: str | Path, max_batch: int) -> ServedModel:
    """Open MODEL (as `predict --checkpoint` takes it) and run one image through it.

    Ready then: with JAX, the larger batch sizes are prepared in a background thread
    (from the program cache in well under a second each, else compiled: seconds each),
    and until a size is ready its batches are answered in slices of a ready one.
    """
    path = Path(path)
    start = time.perf_counter()
    classifier = open_classifier(path)
    backend = "onnxruntime" if isinstance(classifier, OnnxClassifier) else "jax"
    # The name only: where the model lives on the server is none of a client's business.
    info = {"model": path.absolute().name, "backend": backend, "class_names": list(classifier.class_names),
            "image_size": classifier.image_size, "checkpoint_step": checkpoint_step(path)}
    loaded = time.perf_counter()
    size = classifier.image_size
    classifier.probabilities(np.zeros((1, size, size, 3), np.uint8))
    sizes = warm_up_sizes(backend, max_batch)[1:]
    if sizes:
        def done(seconds: float) -> None:
            log.info("batch sizes %s ready %.1f s after the first", ", ".join(map(str, sizes)), seconds)

        classifier.warm_in_background(sizes, done)
    return ServedModel(classifier, info, loaded - start, time.perf_counter() - loaded)
