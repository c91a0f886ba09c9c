"""`arm-jax evaluate`: WA, UA, per-class accuracy and the confusion matrix of a model on a split."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arm_jax.inference.calibrate import calibrate_gar
from arm_jax.data.pipeline import make_loader, steps_in_epoch
from arm_jax.errors import UserError
from arm_jax.inference.runner import batched_logits, model_and_split
from arm_jax.inference.metrics import confusion_matrix, summarize
from arm_jax.interop.model_files import LoadedModel
from arm_jax.models import GAR_MODES, with_runtime


@dataclass(frozen=True)
class EvaluationReport:
    """What `evaluate` measured, JSON-able through `to_json`."""

    checkpoint: str
    dataset: str
    split: str
    gar: str
    batch_size: int
    shuffled: bool
    seed: int
    class_names: tuple[str, ...]
    confusion: list[list[int]]
    wa: float
    ua: float
    per_class: dict[str, float | None]
    count: int
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate(checkpoint: str | Path, dataset: str, data_dir: str | Path | None, *, split: str = "test",
             batch_size: int = 64, gar: str = "running", seed: int = 0, shuffle: bool | None = None,
             calibrate: bool = False, skip_bad: bool = False, worker_count: int = 0,
             progress: bool = True) -> EvaluationReport:
    """Evaluate a checkpoint (arm-jax workdir, model directory, or PyTorch file) on one split.

    gar 'running' uses the checkpoint's running GAR (batch-independent); 'batch'
    reproduces the released code: each test batch's own mean, so the result
    depends on batch size and order; its batches are shuffled with `seed`
    unless `shuffle=False`.
    """
    if gar not in GAR_MODES:
        raise UserError(f"--gar must be one of {', '.join(GAR_MODES)}, got {gar!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    loaded, test_split = model_and_split(checkpoint, dataset, data_dir, split, skip_bad=skip_bad)
    if tuple(loaded.class_names) != tuple(test_split.class_names):
        raise UserError(f"{checkpoint}: its classes ({', '.join(loaded.class_names)}) are not {dataset}'s "
                        f"({', '.join(test_split.class_names)}), in that order")
    if gar == "running" and not loaded.gar_calibrated:
        if not calibrate:
            raise UserError(
                f"{checkpoint}: has no running GAR (PyTorch checkpoints and untrained models carry none). Estimate it from "
                "training images with --calibrate (or `arm-jax calibrate`), or use --gar batch")
        _, train_split = model_and_split(checkpoint, dataset, data_dir, "train", skip_bad=skip_bad)
        loaded = calibrate_gar(loaded, train_split, seed=seed, progress=progress)

    shuffled = (gar == "batch") if shuffle is None else shuffle
    model = with_runtime(loaded.model, gar_mode=gar)
    start = time.perf_counter()
    labels, predictions = predict_split(loaded, model, test_split, batch_size=batch_size, seed=seed,
                                        shuffled=shuffled, worker_count=worker_count, progress=progress)
    matrix = confusion_matrix(labels, predictions, model.num_classes)
    summary = summarize(matrix, loaded.class_names)
    return EvaluationReport(
        checkpoint=str(checkpoint), dataset=dataset, split=split, gar=gar, batch_size=batch_size,
        shuffled=shuffled, seed=seed, class_names=tuple(loaded.class_names), confusion=matrix.tolist(),
        wa=summary["wa"], ua=summary["ua"], per_class=summary["per_class"], count=summary["count"],
        seconds=time.perf_counter() - start,
    )


def predict_split(loaded: LoadedModel, model, split, *, batch_size: int, seed: int, shuffled: bool,
                  worker_count: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted labels) over the split, in the order the batches were formed."""
    loader = make_loader(split, batch_size=batch_size, seed=seed, epoch=0, train=False,
                         image_size=model.image_size, worker_count=worker_count, shuffle_eval=shuffled)
    expected_batches = steps_in_epoch(split, batch_size, sampler="shuffle", train=False)
    pad_to = None if (model.affinity and model.gar_mode == "batch") else batch_size
    labels, predictions = [], []
    bar = tqdm(total=len(split), unit="img", desc=f"evaluate {split.name}", disable=not progress)
    for batch, logits in batched_logits(loaded, model, iter(loader), pad_to=pad_to):
        labels.append(batch["label"])
        predictions.append(logits.argmax(-1))
        bar.update(len(batch["label"]))
    bar.close()
    if len(labels) != expected_batches:
        raise RuntimeError(f"expected {expected_batches} batches, got {len(labels)}")
    return np.concatenate(labels), np.concatenate(predictions)
