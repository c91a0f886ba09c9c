"""Custom-gradient convolutions equal jax.grad of the plain convolution (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.models.conv import plain_conv, polyphase_input_grad, strided_conv

# (height, width, kernel, stride, padding): ResNet-18's strided convs (3x3/2 pad 1, 1x1/2)
# at odd and even sides, plus a stride 3 and a kernel smaller than its stride (phases without taps).
CASES = [(9, 8, 3, 2, 1), (9, 8, 1, 2, 0), (10, 11, 5, 3, 2), (6, 6, 2, 3, 0)]


def _relative(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))


@pytest.mark.parametrize(("height", "width", "kernel_size", "stride", "padding"), CASES)
def test_custom_gradients_equal_plain_conv_gradients(height, width, kernel_size, stride, padding):
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(height * 31 + kernel_size), 3)
        x = jax.random.normal(keys[0], (2, height, width, 3), jnp.float64)
        kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 3, 4), jnp.float64)
        grad = jax.random.normal(keys[2], plain_conv(x, kernel, stride, padding).shape, jnp.float64)

        @jax.jit  # one compilation per case: op-by-op dispatch of the float64 graph is slow
        def both(x, kernel, grad):
            out, plain_vjp = jax.vjp(lambda x, k: plain_conv(x, k, stride, padding), x, kernel)
            custom_out, custom_vjp = jax.vjp(lambda x, k: strided_conv(x, k, stride, padding), x, kernel)
            polyphase = polyphase_input_grad(grad, kernel, stride, padding, x.shape)
            return out, custom_out, plain_vjp(grad), custom_vjp(grad), polyphase

        out, custom_out, (want_x, want_k), (got_x, got_k), polyphase = both(x, kernel, grad)
        np.testing.assert_array_equal(custom_out, out)
        assert _relative(got_x, want_x) <= 1e-9
        assert _relative(got_k, want_k) <= 1e-9
        assert _relative(polyphase, want_x) <= 1e-9

