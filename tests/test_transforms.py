"""Augmentations, the resize convention, and host/device preprocessing agreement."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from arm_jax.data import transforms
from arm_jax.data.base import resize_uint8
from tests import numpy_preprocess


def _rng(seed=0):
    return np.random.default_rng(seed)


# The released train transform's definition (REFERENCE.md), written out rather than read from
# transforms' constants, so that a wrong constant there fails here.
P_UNTOUCHED, P_FLIP, P_NOISE = 0.5, 0.25, 0.25
NOISE_STD = math.sqrt(30 + 1 / 12)  # variance 30, plus rounding to whole grey levels (1/12)
P_ERASE = 0.5
DRAWS = 4000


def _keys(n: int, epoch: int = 0, root: int = 7):
    return transforms.augmentation_keys(jax.random.key(root), jnp.full(n, epoch, jnp.int32),
                                        jnp.arange(n, dtype=jnp.int32))


def _classify(original: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """0 untouched, 1 flipped, 2 noised, per output image."""
    same = (outputs == original).all(axis=(1, 2, 3))
    flipped = (outputs == original[:, ::-1]).all(axis=(1, 2, 3))
    return np.where(same, 0, np.where(flipped, 1, 2))


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_device_flip_and_noise_have_the_released_transforms_statistics():
    """4000 device draws (one key per record) against the released transform's definition and its
    numpy implementation's 4000 draws: untouched / flipped / noised with p 0.5 / 0.25 / 0.25; the
    noise N(0, 30) per pixel at the image's own size, unbiased, rounded to whole levels, clipped to
    0..255 (about half the draws at 0 or 255 stay there)."""
    rng = np.random.default_rng(0)
    image = np.full((6, 7, 3), 128, np.uint8)
    image[1, 0] = [0, 255, 30]  # asymmetric, so a flip shows; at the clip levels
    device = np.asarray(jax.jit(transforms.flip_or_noise)(jnp.broadcast_to(image, (DRAWS, *image.shape)).astype(
        jnp.float32), _keys(DRAWS)))
    reference = np.stack([numpy_preprocess.flip_or_noise(image, rng) for _ in range(DRAWS)])
    assert device.min() >= 0 and device.max() <= 255 and (device == np.round(device)).all()
    residuals = {}
    for name, outputs in (("device", device), ("reference", reference.astype(np.float32))):
        kinds = _classify(image.astype(np.float32), outputs)
        counts = np.bincount(kinds, minlength=3)
        for count, p in zip(counts, (P_UNTOUCHED, P_FLIP, P_NOISE), strict=True):
            assert _within(count, DRAWS, p), (name, counts)
        noised = outputs[kinds == 2]
        residuals[name] = (noised[:, 2:, :] - 128).ravel()  # the mid-grey pixels
        assert abs(residuals[name].std() - NOISE_STD) < 0.05 * NOISE_STD, name
        assert abs(residuals[name].mean()) < 0.05, name  # rounding, unlike truncation, does not darken
        at_zero, at_top = noised[:, 1, 0, 0], noised[:, 1, 0, 1]
        assert 0.45 < (at_zero == 0).mean() < 0.62 and 0.45 < (at_top == 255).mean() < 0.62, name
    assert scipy.stats.ks_2samp(residuals["device"], residuals["reference"]).pvalue > 1e-3


def test_flip_or_noise_draws_the_same_image_by_image_as_vectorised():
    """On a CPU the images go one by one (noise drawn only where used); vectorised, as on a GPU,
    every draw is the same."""
    images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (64, 5, 6, 3)), jnp.float32)
    keys = _keys(64)
    vectorised = jax.jit(jax.vmap(transforms.flip_or_noise_one))(images, keys)
    np.testing.assert_array_equal(np.asarray(jax.jit(transforms.flip_or_noise)(images, keys)), np.asarray(vectorised))
    assert (np.asarray(vectorised) != np.asarray(images)).any(axis=(1, 2, 3)).sum() >= 16


def test_device_erase_boxes_follow_torchvision_random_erasing():
    """4000 device boxes on a 224 square against 4000 of the numpy RandomErasing.get_params: erased
    with p 0.5; sides, corners, areas and aspect ratios drawn from one distribution (two-sample
    Kolmogorov-Smirnov); every box strictly inside; no box when none of the 10 attempts fits."""
    size, rng = 224, np.random.default_rng(4)
    device = np.asarray(jax.jit(transforms.sample_erase_boxes, static_argnums=1)(_keys(DRAWS), size))
    reference = np.stack([numpy_preprocess.sample_erase_box(rng, size) for _ in range(DRAWS)])
    assert device.dtype == np.int32 and device.shape == (DRAWS, 4)
    erased = {}
    for name, boxes in (("device", device), ("reference", reference)):
        chosen = boxes[:, 2] > 0
        assert _within(chosen.sum(), DRAWS, P_ERASE), name  # every attempt fits at this scale
        assert (boxes[~chosen] == 0).all(), name
        top, left, h, w = boxes[chosen].T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
        area, ratio = h * w / size**2, h / w
        # h and w are rounded, so the area can exceed the scale range by a pixel's worth.
        slack = (math.sqrt(0.1) * size + 1) ** 2 / size**2 - 0.1
        assert area.min() >= 0.02 - slack and area.max() <= 0.1 + slack, name
        assert abs(np.log(ratio).mean() - np.log(0.3 * 3.3) / 2) < 0.05, name  # log-uniform in [0.3, 3.3]
        erased[name] = {"top": top, "left": left, "height": h, "width": w, "area": area, "ratio": ratio,
                        "top in range": top / (size - h + 1), "left in range": left / (size - w + 1)}
    for part in erased["device"]:
        assert scipy.stats.ks_2samp(erased["device"][part], erased["reference"][part]).pvalue > 1e-3, part
    never_fits = jax.jit(functools.partial(transforms.sample_erase_boxes, image_size=10, p=1.0, scale=(0.99, 1.0),
                                           ratio=(3, 4)))(_keys(64))
    assert (np.asarray(never_fits) == 0).all()  # torchvision leaves the image untouched


def test_a_records_draws_depend_on_its_epoch_and_position_alone():
    """A record's augmentation is the same in any batch (any worker count, process, device or resume
    puts it elsewhere) and differs between epochs and positions."""
    images = np.random.default_rng(1).integers(0, 256, (16, 9, 9, 3), np.uint8)
    fn = jax.jit(functools.partial(transforms.device_preprocess, image_size=12))
    whole = np.asarray(fn(images, augment_keys=_keys(16)))
    keys = _keys(16)
    halves = [np.asarray(fn(images[rows], augment_keys=keys[rows])) for rows in (slice(0, 8), slice(8, 16))]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    reversed_ = np.asarray(fn(images[::-1], augment_keys=keys[::-1]))
    np.testing.assert_array_equal(reversed_[::-1], whole)
    for other in (_keys(16, epoch=1), _keys(16, root=8)):
        assert not np.array_equal(np.asarray(fn(images, augment_keys=other)), whole)
    keys_data = jax.random.key_data(keys)
    assert len({tuple(k) for k in np.asarray(keys_data).tolist()}) == 16


def test_device_preprocess_augments_then_resizes_normalises_and_erases():
    """With keys, device_preprocess = the numpy preprocessing (resize, normalise, erase: a second
    implementation) of the device's flipped/noised images with the device's boxes; without, the
    same with no augmentation at all."""
    images = np.random.default_rng(2).integers(0, 256, (12, 10, 10, 1), np.uint8)
    keys = _keys(12, epoch=4)
    fn = jax.jit(functools.partial(transforms.device_preprocess, image_size=24))
    split = jax.jit(jax.vmap(jax.random.split))(keys)
    pixels = np.asarray(jax.jit(transforms.flip_or_noise)(jnp.asarray(images, jnp.float32), split[:, 0])).astype(np.uint8)
    boxes = np.asarray(jax.jit(transforms.sample_erase_boxes, static_argnums=1)(split[:, 1], 24))
    assert (pixels != images).any(axis=(1, 2, 3)).sum() >= 3 and (boxes[:, 2] > 0).sum() >= 3  # draws happened
    want = numpy_preprocess.host_preprocess(pixels, boxes, image_size=24)
    assert np.abs(np.asarray(fn(images, augment_keys=keys)) - want).max() < 1e-4
    plain = numpy_preprocess.host_preprocess(images, np.zeros((12, 4), np.int32), image_size=24)
    assert np.abs(np.asarray(fn(images)) - plain).max() < 1e-4


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
    fn = jax.jit(lambda images, boxes: transforms.erase(transforms.device_preprocess(images, image_size=24), boxes))
    for shape in ((2, 12, 12, 1), (2, 40, 40, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        host = numpy_preprocess.host_preprocess(images, boxes, image_size=24)
        device = np.asarray(fn(jnp.asarray(images), jnp.asarray(boxes)))
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
    out = transforms.device_preprocess(images, image_size=8, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 8, 8, 3)


def test_to_channels_replicates_gray_and_takes_luma_of_rgb():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    rgb = transforms.to_channels(gray, 3)
    assert rgb.shape == (2, 3, 3) and (rgb == gray).all()
    back = transforms.to_channels(np.full((1, 1, 3), [255, 0, 0], np.uint8), 1)
    assert back[0, 0, 0] == round(0.299 * 255)
