"""Confusion matrix, WA and UA against values computed by hand."""

import math

import numpy as np
import pytest

from arm_jax.metrics import (confusion_matrix, per_class_accuracy, summarize,
                             unweighted_accuracy, weighted_accuracy)


def test_hand_computed_example():
    labels = [0, 0, 0, 0, 1, 1, 2]
    preds = [0, 0, 0, 1, 1, 2, 2]
    m = confusion_matrix(labels, preds, 3)
    assert m.tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert weighted_accuracy(m) == pytest.approx(5 / 7)
    np.testing.assert_allclose(per_class_accuracy(m), [0.75, 0.5, 1.0])
    assert unweighted_accuracy(m) == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_class_absent_from_labels_is_left_out_of_ua():
    # class 2 has no true examples, but is predicted once (which costs class 1 its recall).
    m = confusion_matrix([0, 0, 1, 1], [0, 0, 1, 2], 3)
    acc = per_class_accuracy(m)
    assert acc[:2].tolist() == [1.0, 0.5] and math.isnan(acc[2])
    assert unweighted_accuracy(m) == pytest.approx(0.75)
    assert summarize(m, ["a", "b", "c"])["per_class"] == {"a": 1.0, "b": 0.5, "c": None}


def test_empty_and_bad_inputs():
    m = confusion_matrix([], [], 2)
    assert math.isnan(weighted_accuracy(m)) and math.isnan(unweighted_accuracy(m))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)
