"""Classification metrics: confusion matrix, WA (overall accuracy), UA (mean class accuracy).

Below both the training loop (validation) and inference (evaluate), which use them.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def weighted_accuracy(matrix: np.ndarray) -> float:
    """WA: correct / all examples (the paper's 'accuracy'); NaN with no examples."""
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class with no examples among the labels."""
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)


def unweighted_accuracy(matrix: np.ndarray) -> float:
    """UA: mean of the per-class accuracies over the classes PRESENT among the labels.

    A class with no true examples has no accuracy to average (0/0), so it is left out
    rather than counted as 0 or 1: UA then stays comparable when an evaluation split
    lacks a class. Predictions of such a class still lower the other classes' recall.
    NaN when there are no examples at all.
    """
    accuracies = per_class_accuracy(matrix)
    present = ~np.isnan(accuracies)
    return float(accuracies[present].mean()) if present.any() else float("nan")


def summarize(matrix: np.ndarray, class_names=None) -> dict:
    """WA, UA and per-class accuracy as a JSON-able dict."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(matrix))]
    return {
        "wa": weighted_accuracy(matrix),
        "ua": unweighted_accuracy(matrix),
        "per_class": {n: (None if np.isnan(a) else float(a))
                      for n, a in zip(names, per_class_accuracy(matrix))},
        "count": int(matrix.sum()),
    }
