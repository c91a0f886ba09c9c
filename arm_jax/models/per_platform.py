"""The model's one seam with the machine: an operation is computed in the form XLA:CPU runs
fastest where the program is compiled for the CPU, and in its plain form elsewhere.

The choice is `jax.lax.platform_dependent`'s, made when the program is lowered for a
platform, not from the machine that traces it: both forms are traced, and lowering keeps
the one for its platform. So a training step lowered on a CPU host for CUDA (`jax.export`
with platforms=["cuda"]) carries only the plain forms, and a program lowered for several
platforms (`arm-jax export --stablehlo`) carries both, the right one picked when it is
compiled. Within a form, the choice by dtype and map size is static. The forms compute the
same values (tests/test_conv.py, tests/test_pooling.py); only their speed differs.
"""

from functools import partial

import jax
from flax import linen as nn

from arm_jax.models import pooling
from arm_jax.models.conv import cpu_conv, plain_conv


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """PyTorch's Conv2d(bias=False) in NHWC / HWIO: square stride, symmetric zero padding."""
    return jax.lax.platform_dependent(x, kernel, cpu=partial(cpu_conv, stride=stride, padding=padding),
                                      default=partial(plain_conv, stride=stride, padding=padding))


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch's MaxPool2d in NHWC: square window and stride, symmetric padding."""
    return jax.lax.platform_dependent(x, cpu=partial(pooling.max_pool, window=window, stride=stride, padding=padding),
                                      default=partial(plain_max_pool, window=window, stride=stride, padding=padding))


def plain_max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """`flax.linen.max_pool`: one reduce-window, differentiated by XLA's select-and-scatter."""
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding), (padding, padding)))
