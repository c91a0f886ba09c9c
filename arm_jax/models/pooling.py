"""Max pooling whose gradient XLA:CPU runs ~4-8x faster than `flax.linen.max_pool`'s
(`per_platform.max_pool` picks it where the program is compiled for the CPU).

JAX differentiates `lax.reduce_window(max)` through select-and-gather over (value, index)
pairs: on CPU that is a large iota, a second reduce-window and a scatter, ~215 ms of the
~1.25 s training step of ARM-ResNet-18 at 112 px (the stem's 3x3/2 pool over 32x56x56x64;
PyTorch keeps the argmax indices from the forward pass). Here the k*k taps of each window
are strided slices of the padded input: the forward pass is their elementwise maximum, and
the backward pass sends each output gradient to the first tap (row-major) equal to the
maximum, the element PyTorch and `flax.linen.max_pool` both pick among ties (a window of
ReLU zeros is common), as a sum of zero-interleaved pads that XLA fuses. Measured, forward
plus backward: 215 -> 27 ms at 32x56x56x64, 815 -> 219 ms at 32x112x112x64.
"""

from functools import partial

import jax
import jax.numpy as jnp

from arm_jax.models.conv import window_taps


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """NHWC max pooling, square window and stride, symmetric padding (PyTorch's MaxPool2d)."""
    return _max_pool_fwd(x, window, stride, padding)[0]


def _padded_and_taps(x: jax.Array, window: int, stride: int, padding: int):
    """The input padded with -inf, and its window*window taps (`window_taps`, row-major)."""
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    return padded, window_taps(padded, window, stride)


def _max_pool_fwd(x, window, stride, padding):
    _, taps = _padded_and_taps(x, window, stride, padding)
    pooled = taps[0]
    for tap in taps[1:]:
        pooled = jnp.maximum(pooled, tap)
    return pooled, (x, pooled)


def _max_pool_bwd(window, stride, padding, residuals, grad):
    x, pooled = residuals
    padded, taps = _padded_and_taps(x, window, stride, padding)
    out_h, out_w = pooled.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    taken = jnp.zeros(pooled.shape, bool)  # windows whose maximum already got the gradient
    padded_grad = jnp.zeros(padded.shape, grad.dtype)
    for k, tap in enumerate(taps):
        i, j = divmod(k, window)
        first_max = (tap == pooled) & ~taken
        taken = taken | first_max
        # Back to the padded input's grid: element (q, r) of the tap sits at (i + s q, j + s r).
        padded_grad = padded_grad + jax.lax.pad(
            jnp.where(first_max, grad, zero), zero,
            ((0, 0, 0),
             (i, padded.shape[1] - i - stride * (out_h - 1) - 1, stride - 1),
             (j, padded.shape[2] - j - stride * (out_w - 1) - 1, stride - 1),
             (0, 0, 0)))
    height, width = x.shape[1:3]
    return (padded_grad[:, padding:padding + height, padding:padding + width, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
