"""Synthetic faces: deterministic from (seed, split, index), balanced, and not trivial."""

import pickle

import numpy as np
import pytest
from PIL import Image

from arm_jax.data.splits import open_split
from arm_jax.data.synthetic import SyntheticSplit, draw


def test_same_seed_same_bytes_different_seed_differs():
    a, b = SyntheticSplit("train", seed=3, size=14), SyntheticSplit("train", seed=3, size=14)
    assert np.array_equal(a.labels, b.labels)
    for i in (0, 5, 13):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
    other = SyntheticSplit("train", seed=4, size=14)
    assert any(a[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(3))
    # Random access: image 9 does not depend on which images were drawn before.
    assert a[9]["image"].tobytes() == draw(3, "train", 9, int(a.labels[9])).tobytes()
    assert pickle.loads(pickle.dumps(a))[5]["image"].tobytes() == a[5]["image"].tobytes()


def test_splits_differ_and_shapes():
    train, val = SyntheticSplit("train", size=7), SyntheticSplit("val", size=7)
    assert train[0]["image"].shape == (64, 64, 3) and train[0]["image"].dtype == np.uint8
    assert train[0]["image"].tobytes() != val[0]["image"].tobytes()


def test_default_sizes_are_balanced():
    for split, size in [("train", 2100), ("val", 700), ("test", 700)]:
        labels = open_split("synthetic", None, split).labels
        assert len(labels) == size and labels.dtype == np.int32
        assert np.bincount(labels, minlength=7).tolist() == [size // 7] * 7
        assert not np.array_equal(labels[:7], np.arange(7))   # shuffled, not cyclic


def test_classes_differ_by_geometry_not_by_mean_brightness():
    # Same-class images vary more in brightness than class means differ: pixels alone
    # (without the face's geometry) must not give the class away.
    split = SyntheticSplit("train", size=140)
    brightness = np.array([split[i]["image"].mean() for i in range(len(split))])
    class_means = np.array([brightness[split.labels == k].mean() for k in range(7)])
    assert class_means.std() < 0.5 * brightness.std()


@pytest.mark.slow  # fast tier: draws 1,050 synthetic faces and fits a classifier (30 s under load)
def test_learnable_but_not_trivial():
    # Softmax regression on 16x16 gray pixels: well above chance (1/7), far from perfect.
    def features(split, size):
        s = SyntheticSplit(split, size=size)
        x = np.stack([np.asarray(Image.fromarray(s[i]["image"]).convert("L").resize((16, 16)),
                                 np.float32).ravel() for i in range(size)])
        x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
        return x, s.labels

    (x, y), (x_test, y_test) = features("train", 700), features("test", 350)
    w, b = np.zeros((x.shape[1], 7)), np.zeros(7)
    for _ in range(300):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = p - np.eye(7)[y]
        w -= 0.05 * (x.T @ grad / len(x) + 1e-3 * w)
        b -= 0.05 * grad.mean(0)
    accuracy = ((x_test @ w + b).argmax(1) == y_test).mean()
    assert 0.3 < accuracy < 0.85, accuracy
