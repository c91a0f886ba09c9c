"""ResNet-18 backbone, laid out and initialised like torchvision's `resnet18` (NHWC)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from arm_jax.models import per_platform
from arm_jax.models.batchnorm import BatchNorm

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


class Conv(nn.Module):
    """A bias-free square conv with explicit symmetric padding, NHWC / HWIO.

    XLA's 'SAME' pads a stride-2 conv (2, 3) where PyTorch pads (3, 3): the
    outputs differ, so every padding here is written out as PyTorch's.
    The parameter is named `kernel` and initialised as `nn.Conv` would. How the
    convolution is computed on each platform is `per_platform.conv`'s choice.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        return per_platform.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


def conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, param_dtype: Any, name: str) -> Conv:
    return Conv(features, kernel, stride, padding, dtype, param_dtype, name=name)


class Downsample(nn.Module):
    """The 1x1 stride-2 projection of a stage's first block (`downsample.0/.1`)."""

    features: int
    dtype: Any
    param_dtype: Any
    axis_name: str | None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(self.features, 1, 2, 0, self.dtype, self.param_dtype, "conv")(x)
        return BatchNorm(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train=train)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (torchvision `BasicBlock`)."""

    features: int
    stride: int
    dtype: Any
    param_dtype: Any
    axis_name: str | None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(name):
            return BatchNorm(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        residual = x
        y = conv(self.features, 3, self.stride, 1, self.dtype, self.param_dtype, "conv1")(x)
        y = nn.relu(norm("bn1")(y, train=train))
        y = conv(self.features, 3, 1, 1, self.dtype, self.param_dtype, "conv2")(y)
        y = norm("bn2")(y, train=train)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = Downsample(self.features, self.dtype, self.param_dtype, self.axis_name, name="downsample")(
                x, train=train
            )
        return nn.relu(y + residual)


class ResNet18Backbone(nn.Module):
    """torchvision resnet18 up to (not including) `avgpool`: returns the (N, h, w, 512) map."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(64, 7, 2, 3, self.dtype, self.param_dtype, "conv1")(x.astype(self.dtype))
        x = BatchNorm(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(x, train=train)
        x = nn.relu(x)
        x = per_platform.max_pool(x, 3, 2, 1)
        for stage, width in enumerate(STAGE_WIDTHS, start=1):
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(width, stride, self.dtype, self.param_dtype, self.axis_name, name=f"layer{stage}_{block}")(
                    x, train=train
                )
        return x


def largest_activation_bytes(batch: int, image_size: int) -> int:
    """Bytes of the backbone's largest intermediate in training: the stem conv's (batch, S/2, S/2, 64)
    output in float32 (BatchNorm computes in float32 also for a bfloat16 model; the BatchNorm, ReLU
    and gradient maps of the stem are as large; every later map is smaller)."""
    side = -(-image_size // 2)
    return batch * side * side * STAGE_WIDTHS[0] * 4


def backbone_output_side(image_size: int) -> int:
    """Side of the backbone's output map for a square input: five halvings, each rounding up."""
    side = image_size
    for _ in range(5):  # conv1, maxpool, layer2, layer3, layer4: each ceil(side / 2)
        side = -(-side // 2)
    return side
