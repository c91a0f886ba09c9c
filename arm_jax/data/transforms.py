"""Image transforms of the released training code, all but staging on the device.

Host, per record (numpy): only bringing an image to the batch's staging shape
(`to_channels`, and the loader's resize for splits whose images differ in size). Device, per
batch (pure jax, inside the jitted step): the released train transform's flip or Gaussian
noise at the image's own size, resize, gray -> RGB, ImageNet normalisation, and
RandomErasing, its box drawn there too. Every random draw of a training record comes from
one key per record, derived from (the run's seed, epoch, position in the epoch's order)
(`augmentation_keys`), so a batch does not depend on the worker count, the number of
processes or devices, or a resume. Small FER images (48x48x1) travel at native size:
224*224*3 / (48*48) = 65x fewer bytes. The model meets these through `arm_jax.forward`
(tests/numpy_preprocess.py holds a second implementation, and the released transforms'
definition the augmentation's statistics are checked against).
"""

import functools
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


# ---- host, per record -------------------------------------------------------------------

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

def augmentation_keys(root: jax.Array, epochs: jax.Array, positions: jax.Array) -> jax.Array:
    """(N,) keys: the record at `positions[i]` of epoch `epochs[i]`'s order draws from key i.

    `root` is the run's augmentation key (training/steps.py derives it from the seed); a
    record's draws depend on nothing else, so batches are the same whichever worker, process or
    device prepares them, and a resumed run draws what an uninterrupted one would.
    """
    return jax.vmap(lambda epoch, position: jax.random.fold_in(jax.random.fold_in(root, epoch), position))(
        epochs, positions)


def flip_or_noise(images: jax.Array, keys: jax.Array, *, variance: float = NOISE_VARIANCE) -> jax.Array:
    """The released basic augmentation on float32 (N, H, W, C) pixels in 0..255, one key per image:
    with p 0.5 a horizontal flip or Gaussian noise (equally likely), at the image's own size.

    The noise is N(0, variance), clipped to 0..255 and rounded to whole grey levels. The released
    code (SCN-style image_utils) truncates with astype(uint8) instead, which darkens noised images
    by 0.5 grey levels on average: rounding is unbiased, a deliberate, documented difference.
    """
    one = functools.partial(flip_or_noise_one, variance=variance)
    # The same draws either way. Vectorised, every image's noise is drawn and most thrown away:
    # on a CPU that was 3% of a 112 px training step (threefry for 1M pixels), so there the
    # images go one by one and only the noised quarter draws any; a GPU takes one vectorised pass.
    return jax.lax.platform_dependent(images, keys, cpu=lambda x, k: jax.lax.map(lambda pair: one(*pair), (x, k)),
                                      default=jax.vmap(one))


def flip_or_noise_one(image: jax.Array, key: jax.Array, *, variance: float = NOISE_VARIANCE) -> jax.Array:
    """`flip_or_noise` of one (H, W, C) image."""
    apply_key, which_key, noise_key = jax.random.split(key, 3)
    augmented = jax.random.uniform(apply_key) < BASIC_AUG_P
    flip = jax.random.bernoulli(which_key)

    def noised(image):
        noise = jax.random.normal(noise_key, image.shape, image.dtype) * math.sqrt(variance)
        return jnp.round(jnp.clip(image + noise, 0.0, 255.0))

    def flipped_or_not(image):
        return jnp.where(augmented, image[:, ::-1], image)

    return jax.lax.cond(augmented & ~flip, noised, flipped_or_not, image)


def sample_erase_boxes(keys: jax.Array, image_size: int, *, p: float = ERASE_P,
                       scale: tuple[float, float] = ERASE_SCALE,
                       ratio: tuple[float, float] = ERASE_RATIO) -> jax.Array:
    """torchvision RandomErasing.get_params on an image_size square, one key per image:
    (N, 4) int32 (top, left, height, width); all zeros (no erasing) with probability 1 - p, or
    when none of the 10 attempts fits.

    torchvision's loop, drawn at once: 10 attempts of area ~ U(scale) * S^2 and log-uniform
    aspect ratio, sides rounded half to even (Python's round); the first attempt whose box fits
    strictly inside is kept, and only its corner is drawn, uniform over the places it fits.
    """
    area = image_size * image_size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def one(key):
        apply_key, area_key, ratio_key, top_key, left_key = jax.random.split(key, 5)
        erase_area = area * jax.random.uniform(area_key, (ERASE_ATTEMPTS,), minval=scale[0], maxval=scale[1])
        aspect = jnp.exp(jax.random.uniform(ratio_key, (ERASE_ATTEMPTS,), minval=log_ratio[0], maxval=log_ratio[1]))
        heights = jnp.round(jnp.sqrt(erase_area * aspect)).astype(jnp.int32)
        widths = jnp.round(jnp.sqrt(erase_area / aspect)).astype(jnp.int32)
        fits = (heights < image_size) & (widths < image_size)
        first = jnp.argmax(fits)
        height, width = heights[first], widths[first]
        top = jax.random.randint(top_key, (), 0, image_size - height + 1)
        left = jax.random.randint(left_key, (), 0, image_size - width + 1)
        erase = (jax.random.uniform(apply_key) < p) & fits[first]
        return jnp.where(erase, jnp.stack([top, left, height, width]), 0).astype(jnp.int32)

    return jax.vmap(one)(keys)


def device_preprocess(images_uint8: jax.Array, *, image_size: int, augment_keys: jax.Array | None = None,
                      dtype=jnp.float32) -> jax.Array:
    """uint8 (N, H, W, C) -> (N, image_size, image_size, 3) model input; with `augment_keys` (N,)
    (training), the released train transform with each image's key.

    In the released order: flip or noise on the image as it comes, resize (jax.image.resize
    'bilinear'), gray -> 3 channels, ImageNet mean/std, then RandomErasing, which the released
    code runs after Normalize, so its value 0 is 0 in normalised units. Resizing before
    normalising is the same as the reference's resize-then-normalise because both are linear
    and resize weights sum to one. Images already at the size and no keys (inference) trace no
    resize and no augmentation at all.
    """
    x = images_uint8.astype(jnp.float32)
    n, height, width, c = x.shape
    if augment_keys is not None:
        keys = jax.vmap(jax.random.split)(augment_keys)  # (N, 2): the pixels' key, the erasing box's
        x = flip_or_noise(x, keys[:, 0])
    x = x / 255.0
    if (height, width) != (image_size, image_size):
        x = jax.image.resize(x, (n, image_size, image_size, c), method="bilinear")
    x = jnp.broadcast_to(x, (n, image_size, image_size, 3))
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if augment_keys is not None:
        x = erase(x, sample_erase_boxes(keys[:, 1], image_size))
    return x.astype(dtype)


def erase(x: jax.Array, boxes: jax.Array) -> jax.Array:
    """Zero each image of (N, S, S, C) inside its (top, left, height, width) box."""
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    grid = jnp.arange(x.shape[1])[None, :]
    in_rows = (grid >= top) & (grid < top + height)
    in_cols = (grid >= left) & (grid < left + width)
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return jnp.where(inside[..., None], 0.0, x)
