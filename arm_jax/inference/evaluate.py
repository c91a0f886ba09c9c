"""`arm-jax evaluate`: WA, UA, per-class accuracy and the confusion matrix of a model on a split."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arm_jax.data.pipeline import make_loader, read_through, steps_in_epoch
from arm_jax.data.sources import decode_size_hint
from arm_jax.data.splits import open_split
from arm_jax.errors import UserError
from arm_jax.inference.calibrate import calibrate_gar
from arm_jax.inference.runner import batched_logits, name_model
from arm_jax.interop.model_files import LoadedModel, load_any_model
from arm_jax.metrics import per_class_accuracy, weighted_accuracy
from arm_jax.models import GAR_MODES, with_runtime


@dataclass(frozen=True)
class EvaluationReport:
    """What `evaluate` measured, JSON-able through `to_json`.

    Rows of `confusion` are the data set's classes in its own order; its columns are those
    classes followed by `extra_predicted` (model classes the data set does not have).
    """

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
    model_class_names: tuple[str, ...] = ()
    extra_predicted: tuple[str, ...] = ()        # model classes the data set lacks (extra columns)
    unpredictable: dict[str, int] = field(default_factory=dict)  # data classes the model lacks: images
    ua_classes: tuple[str, ...] = ()             # the classes UA averages over
    notes: tuple[str, ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(self.class_names) + tuple(self.extra_predicted)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class ClassMapping:
    """How a model's classes meet a data set's, by canonical name."""

    model_names: tuple[str, ...]
    data_names: tuple[str, ...]

    @property
    def extra_predicted(self) -> tuple[str, ...]:
        return tuple(n for n in self.model_names if n not in self.data_names)

    @property
    def unpredictable(self) -> tuple[str, ...]:
        return tuple(n for n in self.data_names if n not in self.model_names)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(n for n in self.data_names if n in self.model_names)

    def column_of_prediction(self) -> np.ndarray:
        """Model class id -> confusion column (the data set's id, or an extra column)."""
        columns = self.data_names + self.extra_predicted
        return np.asarray([columns.index(n) for n in self.model_names], np.int64)


def evaluate(checkpoint: str | Path, dataset: str, data_dir: str | Path | None, *, split: str = "test",
             batch_size: int = 64, gar: str = "running", seed: int = 0, shuffle: bool | None = None,
             calibrate: bool = False, skip_bad: bool = False, worker_count: int = 0,
             progress: bool = True, class_names: str | tuple[str, ...] | None = None,
             model_classes: str | None = None, calibrate_batch_size: int = 256) -> EvaluationReport:
    """Evaluate a checkpoint (arm-jax workdir, model directory, or PyTorch file) on one split.

    gar 'running' uses the checkpoint's running GAR (batch-independent); 'batch'
    reproduces the released code: each test batch's own mean, so the result
    depends on batch size and order; its batches are shuffled with `seed`
    unless `shuffle=False`.

    The model's classes meet the data set's by canonical name, so a model trained on one
    data set can be evaluated on another. Images of classes the model cannot predict count
    as errors in WA and are listed in `unpredictable`; UA averages the shared classes.
    A model without class names takes them from `class_names` / `model_classes` (a data
    set whose order it was trained in), else assumes the evaluated data set's (warned).
    """
    if gar not in GAR_MODES:
        raise UserError(f"--gar must be one of {', '.join(GAR_MODES)}, got {gar!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    loaded = load_any_model(checkpoint)
    test_split = _open(dataset, data_dir, split, loaded, skip_bad)
    loaded, notes = name_model(loaded, tuple(test_split.class_names), checkpoint, dataset,
                               class_names=class_names, model_classes=model_classes)
    mapping = ClassMapping(tuple(loaded.class_names), tuple(test_split.class_names))
    if not mapping.shared:
        raise UserError(f"{checkpoint}: none of its classes ({', '.join(mapping.model_names)}) is "
                        f"one of {dataset}'s ({', '.join(mapping.data_names)})")
    if gar == "running" and not loaded.gar_calibrated:
        if not calibrate:
            raise UserError(
                f"{checkpoint}: has no running GAR (PyTorch checkpoints and untrained models carry none). Estimate it from "
                "training images with --calibrate (or `arm-jax calibrate`), or use --gar batch")
        train_split = _open(dataset, data_dir, "train", loaded, skip_bad)
        # BatchNorm runs on batch statistics while calibrating: at the training batch size.
        loaded = calibrate_gar(loaded, train_split, batch_size=calibrate_batch_size, seed=seed, progress=progress)

    shuffled = (gar == "batch") if shuffle is None else shuffle
    model = with_runtime(loaded.model, gar_mode=gar)
    start = time.perf_counter()
    labels, predictions = predict_split(loaded, model, test_split, batch_size=batch_size, seed=seed,
                                        shuffled=shuffled, worker_count=worker_count, progress=progress)
    return _report(mapping, labels, predictions, notes, checkpoint=str(checkpoint), dataset=dataset,
                   split=split, gar=gar, batch_size=batch_size, shuffled=shuffled, seed=seed,
                   seconds=time.perf_counter() - start)


def _open(dataset, data_dir, split, loaded: LoadedModel, skip_bad: bool):
    return open_split(dataset, data_dir, split, skip_bad=skip_bad,
                      image_size_hint=decode_size_hint(dataset, loaded.model.image_size))


def _report(mapping: ClassMapping, labels, predictions, notes, **fields) -> EvaluationReport:
    """Confusion (data set rows; its columns, then the model's extra classes), WA, UA, notes."""
    data_count = len(mapping.data_names)
    columns = data_count + len(mapping.extra_predicted)
    matrix = np.zeros((data_count, columns), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64),
                       mapping.column_of_prediction()[np.asarray(predictions, np.int64)]), 1)
    recall = per_class_accuracy(matrix)  # diagonal over row totals; rows are the data classes
    shared = [mapping.data_names.index(n) for n in mapping.shared]
    present = [i for i in shared if not np.isnan(recall[i])]
    total = int(matrix.sum())
    unpredictable = {n: int(matrix[mapping.data_names.index(n)].sum()) for n in mapping.unpredictable}
    notes = list(notes)
    if mapping.unpredictable:
        notes.append(f"the model has no class {', '.join(mapping.unpredictable)}: their "
                     f"{sum(unpredictable.values())} image(s) count as errors in WA; UA is over "
                     "the classes both have")
    if mapping.extra_predicted:
        notes.append(f"{fields['dataset']} has no class {', '.join(mapping.extra_predicted)}: "
                     "predictions of it are errors (extra confusion columns)")
    return EvaluationReport(
        **fields, class_names=mapping.data_names, confusion=matrix.tolist(),
        wa=weighted_accuracy(matrix),  # the diagonal: data classes' columns come first
        ua=float(recall[present].mean()) if present else float("nan"),
        per_class={mapping.data_names[i]: (None if np.isnan(recall[i]) else float(recall[i]))
                   for i in shared},
        count=total, model_class_names=mapping.model_names,
        extra_predicted=mapping.extra_predicted, unpredictable=unpredictable,
        ua_classes=tuple(mapping.data_names[i] for i in present), notes=tuple(notes))


def predict_split(loaded: LoadedModel, model, split, *, batch_size: int, seed: int, shuffled: bool,
                  worker_count: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted labels) over the split, in the order the batches were formed."""
    loader = make_loader(split, batch_size=batch_size, seed=seed, epoch=0, train=False,
                         image_size=model.image_size, worker_count=worker_count, shuffle_eval=shuffled)
    expected_batches = steps_in_epoch(split, batch_size, sampler="shuffle", train=False)
    pad_to = None if (model.affinity and model.gar_mode == "batch") else batch_size
    labels, predictions = [], []
    bar = tqdm(total=len(split), unit="img", desc=f"evaluate {split.name}", disable=not progress)
    for batch, logits in batched_logits(loaded, model, read_through(loader), pad_to=pad_to):
        labels.append(batch["label"])
        predictions.append(logits.argmax(-1))
        bar.update(len(batch["label"]))
    bar.close()
    if len(labels) != expected_batches:
        raise RuntimeError(f"expected {expected_batches} batches, got {len(labels)}")
    return np.concatenate(labels), np.concatenate(predictions)
