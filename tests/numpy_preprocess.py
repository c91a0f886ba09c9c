"""A second implementation of the model's input preprocessing, in float64 numpy, for the tests.

`arm_jax.data.transforms.device_preprocess` (through `arm_jax.forward`) is the one the package
runs; this one is written from the definitions (jax.image.resize's bilinear convention,
ImageNet's mean and std, torchvision's RandomErasing after Normalize) to check it. The released
train transform is written here too, per image with a numpy generator as the released code
draws it (its basic augmentation, torchvision's RandomErasing.get_params): the device's draws are
checked against its statistics.
"""

import math

import numpy as np

from arm_jax.data.transforms import (BASIC_AUG_P, ERASE_ATTEMPTS, ERASE_P, ERASE_RATIO, ERASE_SCALE,
                                     IMAGENET_MEAN, IMAGENET_STD, NOISE_VARIANCE)


def flip_or_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The released basic augmentation of one (H, W, C) uint8 image: with p 0.5, a horizontal flip
    or Gaussian noise (variance 30, clipped, rounded as arm-jax rounds), equally likely."""
    if rng.random() >= BASIC_AUG_P:
        return image
    if rng.integers(2) == 0:
        return np.ascontiguousarray(image[:, ::-1])
    noisy = image + rng.normal(0.0, math.sqrt(NOISE_VARIANCE), image.shape)
    return np.rint(np.clip(noisy, 0.0, 255.0)).astype(np.uint8)


def sample_erase_box(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """torchvision RandomErasing.get_params on an image_size square, as the released code configures
    it: (top, left, height, width) int32, all zeros for no erasing."""
    if rng.random() >= ERASE_P:
        return np.zeros(4, np.int32)
    area = image_size * image_size
    for _ in range(ERASE_ATTEMPTS):
        erase_area = area * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
        h, w = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
        if h < image_size and w < image_size:
            top, left = int(rng.integers(0, image_size - h + 1)), int(rng.integers(0, image_size - w + 1))
            return np.array([top, left, h, w], np.int32)
    return np.zeros(4, np.int32)


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of jax.image.resize 'bilinear' (antialias=True).

    Half-pixel centres; when downscaling the triangle kernel is widened by in/out (the
    antialias), when upscaling it is plain linear interpolation; weights that fall off the
    image are dropped and each row renormalised (so edges clamp).
    """
    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    distance = np.abs(centres[:, None] - np.arange(in_size)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - distance)
    return weights / weights.sum(axis=1, keepdims=True)


def host_preprocess(images_uint8: np.ndarray, erase_boxes: np.ndarray, *, image_size: int,
                    dtype=np.float32) -> np.ndarray:
    """uint8 (N, H, W, C) + (N, 4) (top, left, height, width) boxes -> (N, S, S, 3), float64 inside."""
    x = np.asarray(images_uint8, dtype=np.float64) / 255.0
    x = np.einsum("oh,nhwc->nowc", bilinear_weights(x.shape[1], image_size), x)
    x = np.einsum("pw,nowc->nopc", bilinear_weights(x.shape[2], image_size), x)
    x = np.broadcast_to(x, x.shape[:3] + (3,))
    x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    erased = np.zeros(x.shape[:3], bool)
    for i, (top, left, height, width) in enumerate(np.asarray(erase_boxes)):
        erased[i, top : top + height, left : left + width] = True
    return np.where(erased[..., None], 0.0, x).astype(dtype)
