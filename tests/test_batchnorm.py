"""BatchNorm in training mode: PyTorch's batch statistics and their gradients (float64, against the
formula written out), and the backward pass keeps no activation-sized map but the input itself."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from arm_jax.models.batchnorm import BatchNorm

SHAPE = (4, 6, 6, 8)  # N, H, W, C


def _setup(dtype):
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype) * 3 + 1
    batchnorm = BatchNorm(dtype=dtype, param_dtype=dtype)
    variables = batchnorm.init(jax.random.key(1), x, train=True)
    params = {"scale": jax.random.uniform(jax.random.key(2), (SHAPE[-1],), dtype, 0.5, 1.5),
              "bias": jax.random.normal(jax.random.key(3), (SHAPE[-1],), dtype)}
    return batchnorm, variables, params, x


def _trained(batchnorm, variables):
    def forward(params, x):
        out, _ = batchnorm.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return out
    return forward


def _written_out(params, x):
    """y = (x - mean) / sqrt(biased var + eps) * scale + bias, statistics over N, H, W."""
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["bias"]


def test_values_and_gradients_equal_the_formula_float64():
    with jax.enable_x64(True):
        batchnorm, variables, params, x = _setup(jnp.float64)
        forward = _trained(batchnorm, variables)
        weights = jax.random.normal(jax.random.key(4), SHAPE, jnp.float64)  # a loss that mixes every output

        def loss(f):
            return lambda params, x: jnp.sum(f(params, x) * weights)

        np.testing.assert_allclose(forward(params, x), _written_out(params, x), rtol=1e-12, atol=1e-12)
        got = jax.grad(loss(forward), argnums=(0, 1))(params, x)
        want = jax.grad(loss(_written_out), argnums=(0, 1))(params, x)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), got, want)


def test_backward_pass_keeps_only_the_input_at_activation_size(capsys):
    """The deviations x - mean are recomputed in the backward pass: kept, each BatchNorm of the
    training step wrote one more activation-sized map and read it back (batchnorm.py)."""
    batchnorm, variables, params, x = _setup(jnp.float32)
    jax.ad_checkpoint.print_saved_residuals(_trained(batchnorm, variables), params, x)
    activation_sized = [line for line in capsys.readouterr().out.splitlines()
                        if line.startswith("f32[" + ",".join(map(str, SHAPE)) + "]")]
    assert len(activation_sized) == 1 and "from the argument x" in activation_sized[0], activation_sized
