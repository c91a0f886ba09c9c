"""Max pooling with the custom gradient equals flax.linen.max_pool and its jax.grad (float64),
ties included: the gradient goes to the same element of each window."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.models.pooling import max_pool
from tests.small_models import normal

# (height, width, window, stride, padding): the stem's 3x3/2 pad 1 at odd and even sides,
# overlapping stride-1 windows, and windows that do not overlap.
CASES = [(9, 8, 3, 2, 1), (10, 11, 3, 1, 1), (8, 7, 2, 2, 0)]
INPUTS = {
    "random": lambda x: x,
    "relu": jax.nn.relu,             # windows of zeros: ties, as after the stem's ReLU
    "constant": lambda x: 0 * x + 1,  # every element of every window ties
}


def _relative(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))


# Every case and input in the full suite; the fast tier ties every element only in the stem's case.
PARAMETERS = [pytest.param(*case, kind, id="-".join(map(str, (*case, kind))),
                           marks=pytest.mark.slow if kind == "constant" and case != CASES[0] else ())
              for case in CASES for kind in sorted(INPUTS)]


@pytest.mark.parametrize(("height", "width", "window", "stride", "padding", "kind"), PARAMETERS)
def test_max_pool_and_its_gradient_equal_flax_max_pool(height, width, window, stride, padding, kind):
    with jax.enable_x64(True):
        seed = height * 7 + window + stride
        x = INPUTS[kind](normal(seed, (2, height, width, 3), jnp.float64))

        def flax_pool(x):
            return nn.max_pool(x, (window, window), strides=(stride, stride),
                               padding=((padding, padding), (padding, padding)))

        grad = normal(seed + 1, jax.eval_shape(flax_pool, x).shape, jnp.float64)

        @jax.jit
        def both(x, grad):
            want, want_vjp = jax.vjp(flax_pool, x)
            got, got_vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding), x)
            return want, got, want_vjp(grad)[0], got_vjp(grad)[0]

        want, got, want_grad, got_grad = both(x, grad)
        np.testing.assert_array_equal(got, want)
        assert _relative(got_grad, want_grad) <= 1e-9
        np.testing.assert_array_equal(got_grad != 0, want_grad != 0)  # the same element of each tie
