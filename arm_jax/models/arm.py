"""The Amend Representation Module: Feature Arrangement, De-albino, Sharing Affinity."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from arm_jax.models.batchnorm import BatchNorm

GAR_MODES = ("batch", "running")


def torch_default_uniform(fan_in: int):
    """PyTorch's default init for Conv2d/Linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def pixel_shuffle(x: jax.Array, upscale: int) -> jax.Array:
    """`torch.nn.PixelShuffle` on NHWC: (N, h, w, C*r*r) -> (N, h*r, w*r, C).

    PyTorch's channel order: out[n, r*h + i, r*w + j, c] = in[n, h, w, c*r*r + i*r + j].
    """
    n, h, w, channels = x.shape
    out_channels = channels // (upscale * upscale)
    x = x.reshape(n, h, w, out_channels, upscale, upscale)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # n, h, i, w, j, c
    return x.reshape(n, h * upscale, w * upscale, out_channels)


def per_channel_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Convolve every channel of `x` (NHWC) with the same single-channel kernel, no padding.

    Channels move into the batch so one (k, k, 1, 1) kernel serves them all, which
    is what the released code's `Conv2d(1, 1, ...)` applied per channel computes.
    """
    n, h, w, channels = x.shape
    planes = x.transpose(0, 3, 1, 2).reshape(n * channels, h, w, 1)
    out = jax.lax.conv_general_dilated(
        planes,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    _, oh, ow, _ = out.shape
    return out.reshape(n, channels, oh, ow).transpose(0, 2, 3, 1)


class DeAlbino(nn.Module):
    """A large single-channel kernel with no padding that down-weights the eroded border."""

    kernel_size: int
    stride: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = self.kernel_size * self.kernel_size
        kernel = self.param(
            "kernel", torch_default_uniform(fan_in), (self.kernel_size, self.kernel_size, 1, 1), self.param_dtype
        )
        return per_channel_conv(x, kernel, self.stride)


def uniform_average(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """The fixed stand-in for De-albino in the ablation: a plain average, same window and stride."""
    return nn.avg_pool(x, (kernel_size, kernel_size), strides=(stride, stride), padding="VALID")


class SharingAffinity(nn.Module):
    """Adds `alpha` times the global average representation (GAR) of the batch.

    The released code takes the GAR over the current batch in training and in
    evaluation. `gar_mode="running"` instead uses, at evaluation, an average of
    the training GARs kept in the `gar` collection (like BatchNorm's running
    statistics), so an image's prediction does not depend on its batch-mates.
    The running value averages all GARs of the first 1/momentum steps, then
    becomes an exponential average with that momentum.
    """

    gar_mode: str = "batch"
    momentum: float = 0.1
    axis_name: str | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, representation: jax.Array, *, train: bool) -> jax.Array:
        stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        alpha = self.param("alpha", nn.initializers.ones, (1,), self.param_dtype)
        shape = representation.shape[1:]
        running_gar = self.variable("gar", "mean", jnp.zeros, shape, stats_dtype)
        updates = self.variable("gar", "count", jnp.zeros, (), jnp.int32)

        # Per-batch sums for calibrating the running GAR from data (`arm_jax.inference.calibrate`);
        # a no-op unless the caller makes 'intermediates' mutable.
        self.sow("intermediates", "representation_sum", representation.astype(stats_dtype).sum(axis=0))
        if train or self.gar_mode == "batch":
            gar = representation.astype(stats_dtype).mean(axis=0)
            if self.axis_name is not None:
                gar = jax.lax.pmean(gar, self.axis_name)
        else:
            gar = running_gar.value

        if train and not self.is_initializing():
            weight = jnp.maximum(self.momentum, 1.0 / (updates.value + 1).astype(stats_dtype))
            running_gar.value = (1 - weight) * running_gar.value + weight * gar
            updates.value = updates.value + 1

        return representation + (alpha * gar).astype(representation.dtype)


class ARM(nn.Module):
    """The head that replaces global average pooling, with the paper's ablation switches.

    arrangement: pixel-shuffle the (h, w, 512) map into (16h, 16w, 2) first.
    de_albino: learned single-channel kernel (32/8 after arrangement, `raw_kernel`/1
        on the raw map); off: a fixed uniform average with the same window, or, with
        arrangement off too, the global average pooling of the plain ResNet.
    affinity: Sharing Affinity; off: no alpha, nothing added.
    """

    arrangement: bool = True
    de_albino: bool = True
    affinity: bool = True
    de_albino_kernel: int = 32
    de_albino_stride: int = 8
    raw_kernel: int = 3
    arrangement_upscale: int = 16
    gar_mode: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
        if self.arrangement:
            features = pixel_shuffle(features, self.arrangement_upscale)
            kernel, stride = self.de_albino_kernel, self.de_albino_stride
        else:
            kernel, stride = self.raw_kernel, 1

        if self.de_albino:
            amended = DeAlbino(kernel, stride, self.param_dtype, name="de_albino")(features)
        elif self.arrangement:
            amended = uniform_average(features, kernel, stride)
        else:
            amended = None  # the plain ResNet-18: global average pooling, no BatchNorm

        if amended is None:
            representation = features.mean(axis=(1, 2))
        else:
            amended = BatchNorm(
                axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="bn"
            )(amended, train=train)
            representation = amended.mean(axis=-1)  # the released code's channel mean

        if self.affinity:
            representation = SharingAffinity(
                self.gar_mode, axis_name=self.axis_name, param_dtype=self.param_dtype, name="affinity"
            )(representation, train=train)
        # Row-major flatten, as torch's flatten of the (N, 1, h, w) map.
        return representation.reshape(representation.shape[0], -1)
