"""The served model: a classifier opened as `predict` opens it, its description and its warm-up."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arm_jax.inference.predict import Classifier, OnnxClassifier, open_classifier


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
    from arm_jax.training.checkpoints import read_model_info

    if (path / MODEL_FILE).is_file():
        return None
    return read_model_info(path)[1]


def warm_up_sizes(backend: str, max_batch: int) -> list[int]:
    """The batch sizes to run once before serving.

    JaxClassifier pads a batch to a power of two, so each power up to max_batch is one
    compilation (from the persistent cache after the first start); onnxruntime compiles
    nothing per shape, and one run allocates its buffers.
    """
    if backend == "onnxruntime":
        return [1]
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(2 * sizes[-1])
    return sizes


def open_model(path: str | Path, max_batch: int) -> ServedModel:
    """Open MODEL (as `predict --checkpoint` takes it) and run every batch size it will see once."""
    path = Path(path)
    start = time.perf_counter()
    classifier = open_classifier(path)
    backend = "onnxruntime" if isinstance(classifier, OnnxClassifier) else "jax"
    # The name only: where the model lives on the server is none of a client's business.
    info = {"model": path.absolute().name, "backend": backend, "class_names": list(classifier.class_names),
            "image_size": classifier.image_size, "checkpoint_step": checkpoint_step(path)}
    loaded = time.perf_counter()
    size = classifier.image_size
    for count in warm_up_sizes(backend, max_batch):
        classifier.probabilities(np.zeros((count, size, size, 3), np.uint8))
    return ServedModel(classifier, info, loaded - start, time.perf_counter() - loaded)
