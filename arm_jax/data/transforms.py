"""Image transforms of the released training code, split between host and device.

Host, per record (numpy + a per-record generator): the flip-or-noise augmentation and
drawing the RandomErasing box. Device, per batch (pure jax, inside the jitted step):
resize, gray -> RGB, ImageNet normalisation and applying the erasing box. Small FER
images (48x48x1) then travel at native size: 224*224*3 / (48*48) = 65x fewer bytes.
The model meets these through `arm_jax.forward` (tests/numpy_preprocess.py checks them).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Released train transform (REFERENCE.md): with p 0.5 one of {flip, noise}, equally likely.
BASIC_AUG_P = 0.5
NOISE_VARIANCE = 30.0  # on 0..255 pixel values
# torchvision RandomErasing as configured by the released code.
ERASE_P = 0.5
ERASE_SCALE = (0.02, 0.1)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10  # torchvision's fixed number of tries before giving up

NO_ERASE = np.zeros(4, dtype=np.int32)  # (top, left, height, width); height 0 erases nothing


# ---- host, per record -------------------------------------------------------------------

def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (H, W, C), as a new C-contiguous array."""
    # One strided copy per channel: numpy copies a reversed 3-byte inner run slowly
    # (100x100x3 here: np.ascontiguousarray(image[:, ::-1]) 74-113 us, this 15 us).
    flipped = np.empty(image.shape, image.dtype)
    for c in range(image.shape[-1]):
        flipped[:, :, c] = image[:, ::-1, c]
    return flipped


def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator,
                       variance: float = NOISE_VARIANCE) -> np.ndarray:
    """Add N(0, variance) noise to 0..255 pixels, clip, round back to uint8.

    The released code (SCN-style image_utils) converts with astype(uint8), which truncates
    and darkens noised images by 0.5 grey levels on average; we round to the nearest level
    instead (unbiased), a deliberate, documented difference.
    """
    # float32 draws: about 3x faster than rng.normal's float64, the costliest host step.
    noisy = rng.standard_normal(image.shape, dtype=np.float32)
    noisy *= math.sqrt(variance)
    noisy += image
    return np.rint(np.clip(noisy, 0.0, 255.0, out=noisy), out=noisy).astype(np.uint8)


def flip_or_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The released code's basic augmentation: with p 0.5, a flip or noise (equally likely)."""
    if rng.random() >= BASIC_AUG_P:
        return image
    if rng.integers(2) == 0:
        return flip_horizontal(image)
    return add_gaussian_noise(image, rng)


def sample_erase_box(rng: np.random.Generator, image_size: int, *, p: float = ERASE_P,
                     scale: tuple[float, float] = ERASE_SCALE,
                     ratio: tuple[float, float] = ERASE_RATIO) -> np.ndarray:
    """torchvision RandomErasing.get_params on an image_size square: (top, left, h, w) int32.

    Same algorithm as torchvision (our generator, not torch's): apply with probability p;
    up to 10 attempts of area ~ U(scale) * H * W and log-uniform aspect ratio, keeping the
    first box that fits strictly inside; all zeros (no erasing) if none fits.
    """
    if rng.random() >= p:
        return NO_ERASE.copy()
    area = image_size * image_size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(ERASE_ATTEMPTS):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        # Python's round (half to even), as torchvision uses it.
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < image_size and w < image_size):
            continue
        top = int(rng.integers(0, image_size - h + 1))
        left = int(rng.integers(0, image_size - w + 1))
        return np.array([top, left, h, w], dtype=np.int32)
    return NO_ERASE.copy()


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) uint8, C in {1, 3} -> `channels` channels (gray replicated, RGB -> 601 luma)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.rint(luma)[:, :, None].astype(np.uint8)


# ---- per batch, on the device -------------------------------------------------------------

def device_preprocess(images_uint8: jax.Array, erase_boxes: jax.Array | None, *, image_size: int,
                      dtype=jnp.float32) -> jax.Array:
    """uint8 (N, H, W, C) + (N, 4) boxes or None -> (N, image_size, image_size, 3) model input.

    Resize (jax.image.resize 'bilinear'), gray -> 3 channels, ImageNet mean/std, then zero
    the erasing box: the released code runs RandomErasing after Normalize, so its value 0
    is 0 in normalised units. Resizing before normalising is the same as the reference's
    resize-then-normalise because both are linear and resize weights sum to one. Images
    already at the size and no boxes (inference) trace no resize and no select at all.
    """
    x = images_uint8.astype(jnp.float32) / 255.0
    n, height, width, c = x.shape
    if (height, width) != (image_size, image_size):
        x = jax.image.resize(x, (n, image_size, image_size, c), method="bilinear")
    x = jnp.broadcast_to(x, (n, image_size, image_size, 3))
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if erase_boxes is not None:
        x = jnp.where(_erase_mask(erase_boxes, image_size)[..., None], 0.0, x)
    return x.astype(dtype)


def _erase_mask(boxes: jax.Array, image_size: int) -> jax.Array:
    """(N, S, S) bool: True inside each (top, left, height, width) box."""
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    grid = jnp.arange(image_size)[None, :]
    in_rows = (grid >= top) & (grid < top + height)
    in_cols = (grid >= left) & (grid < left + width)
    return in_rows[:, :, None] & in_cols[:, None, :]
