"""Augmentations, the resize convention, and host/device preprocessing agreement."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.data import transforms
from arm_jax.data.base import resize_uint8
from tests import numpy_preprocess


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape", [(5, 7, 3), (5, 7, 1), (4, 1, 3), (3, 6, 4)])
def test_flip_is_an_exact_mirror(shape):
    image = _rng().integers(0, 256, shape, dtype=np.uint8)
    padded = np.zeros((2 * shape[0], shape[1] + 2, shape[2]), np.uint8)
    padded[::2, 1:-1] = image
    reversed_ = np.ascontiguousarray(image[:, ::-1])[:, ::-1]  # negative strides
    for source in (image, padded[::2, 1:-1], reversed_):
        flipped = transforms.flip_horizontal(source)
        assert flipped.shape == shape and flipped.dtype == np.uint8
        assert flipped.flags.c_contiguous
        for col in range(shape[1]):
            np.testing.assert_array_equal(flipped[:, col], image[:, shape[1] - 1 - col])


def test_noise_has_variance_30_and_is_clipped_and_rounded():
    mid = np.full((200, 200, 1), 128, np.uint8)
    noisy = transforms.add_gaussian_noise(mid, _rng(1)).astype(np.float64) - 128
    # 40,000 draws: the std estimate is within ~0.4% of sqrt(30); rounding adds 1/12 variance.
    assert abs(noisy.std() - math.sqrt(30 + 1 / 12)) < 0.05
    assert abs(noisy.mean()) < 0.1  # rounding, unlike truncation, does not darken
    for level, bound in ((0, 0), (255, 255)):
        edge = transforms.add_gaussian_noise(np.full((100, 100, 1), level, np.uint8), _rng(2))
        assert edge.dtype == np.uint8
        assert (edge == bound).mean() > 0.4  # about half the draws hit the clip


def test_flip_or_noise_applies_one_of_two_with_probability_half():
    image = _rng().integers(0, 256, (6, 6, 1), dtype=np.uint8)
    outcomes = {"same": 0, "flip": 0, "noise": 0}
    rng = _rng(3)
    for _ in range(4000):
        out = transforms.flip_or_noise(image, rng)
        if np.array_equal(out, image):
            outcomes["same"] += 1
        elif np.array_equal(out, image[:, ::-1]):
            outcomes["flip"] += 1
        else:
            outcomes["noise"] += 1
    # Expected 2000 / 1000 / 1000; binomial std <= 32.
    assert abs(outcomes["same"] - 2000) < 130
    assert abs(outcomes["flip"] - 1000) < 120 and abs(outcomes["noise"] - 1000) < 120


def test_erase_boxes_follow_torchvision_random_erasing():
    size, rng = 224, _rng(4)
    boxes = np.stack([transforms.sample_erase_box(rng, size) for _ in range(4000)])
    erased = boxes[:, 2] > 0
    assert abs(erased.mean() - 0.5) < 0.04  # p = 0.5 (every attempt fits at this scale)
    top, left, h, w = boxes[erased].T
    area = h * w / size**2
    # h and w are rounded, so the area can exceed the scale range by a pixel's worth.
    slack = (math.sqrt(0.1) * size + 1) ** 2 / size**2 - 0.1
    assert area.min() >= 0.02 - slack and area.max() <= 0.1 + slack
    ratio = h / w
    assert ratio.min() > 0.3 * 0.8 and ratio.max() < 3.3 * 1.25
    # The log-ratio is uniform: its mean is the middle of [log 0.3, log 3.3].
    assert abs(np.log(ratio).mean() - np.log(0.3 * 3.3) / 2) < 0.05
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    assert (h < size).all() and (w < size).all()


def test_erase_gives_up_when_no_box_fits():
    # Scale near 1 with extreme ratios never fits strictly inside: torchvision returns the
    # whole image untouched (our all-zero box).
    box = transforms.sample_erase_box(_rng(5), 10, p=1.0, scale=(0.99, 1.0), ratio=(3, 4))
    np.testing.assert_array_equal(box, transforms.NO_ERASE)


def test_bilinear_weights_match_jax_resize_up_and_down():
    image = _rng(6).random((1, 13, 9, 1)).astype(np.float32)
    for shape in ((30, 20), (5, 4)):
        want = np.asarray(jax.image.resize(image, (1, *shape, 1), "bilinear"))
        got = np.einsum("oh,nhwc->nowc", numpy_preprocess.bilinear_weights(13, shape[0]), image)
        got = np.einsum("pw,nowc->nopc", numpy_preprocess.bilinear_weights(9, shape[1]), got)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("size", [7, 31])
def test_pil_host_resize_matches_the_device_convention(size):
    image = _rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    host = resize_uint8(image, size).astype(np.float32)
    device = np.asarray(jax.image.resize(image.astype(np.float32), (size, size, 3), "bilinear"))
    assert np.abs(host - device).max() <= 1.0  # uint8 rounding only


def test_normalisation_and_gray_to_rgb_against_hand_values():
    image = np.zeros((1, 2, 2, 1), np.uint8)
    image[0, 0, 0, 0] = 255
    out = numpy_preprocess.host_preprocess(image, np.zeros((1, 4), np.int32), image_size=2)
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(out[0, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                              (1 - 0.406) / 0.225], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                               rtol=1e-6)


def test_device_and_host_preprocess_agree_and_erase_only_the_box():
    rng = _rng(8)
    boxes = np.array([[3, 5, 10, 4], [0, 0, 0, 0]], np.int32)
    fn = jax.jit(transforms.device_preprocess, static_argnames=("image_size", "dtype"))
    for shape in ((2, 12, 12, 1), (2, 40, 40, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        host = numpy_preprocess.host_preprocess(images, boxes, image_size=24)
        device = np.asarray(fn(jnp.asarray(images), jnp.asarray(boxes), image_size=24))
        assert device.shape == (2, 24, 24, 3) and device.dtype == np.float32
        assert np.abs(host - device).max() < 1e-4
        unerased = numpy_preprocess.host_preprocess(images, np.zeros_like(boxes), image_size=24)
        inside = np.zeros((24, 24), bool)
        inside[3:13, 5:9] = True
        assert (device[0][inside] == 0).all()
        np.testing.assert_allclose(device[0][~inside], unerased[0][~inside], atol=1e-4)
        np.testing.assert_allclose(device[1], unerased[1], atol=1e-4)  # zero box: untouched


def test_device_preprocess_casts_to_the_compute_dtype():
    images = jnp.zeros((1, 4, 4, 1), jnp.uint8)
    out = transforms.device_preprocess(images, jnp.zeros((1, 4), jnp.int32), image_size=8,
                                       dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 8, 8, 3)


def test_to_channels_replicates_gray_and_takes_luma_of_rgb():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    rgb = transforms.to_channels(gray, 3)
    assert rgb.shape == (2, 3, 3) and (rgb == gray).all()
    back = transforms.to_channels(np.full((1, 1, 3), [255, 0, 0], np.uint8), 1)
    assert back[0, 0, 0] == round(0.299 * 255)
