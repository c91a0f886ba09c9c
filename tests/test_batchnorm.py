"""BatchNorm in training mode: PyTorch's batch statistics and their gradients (float64, against the
formula written out), statistics in float32 also for a bf16 model, and the backward pass keeps no
activation-sized map but the input itself."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from arm_jax.models.batchnorm import BatchNorm
from tests.small_models import normal

SHAPE = (4, 6, 6, 8)  # N, H, W, C


def _setup(dtype):
    x = normal(0, SHAPE, dtype) * 3 + 1
    batchnorm = BatchNorm(dtype=dtype, param_dtype=dtype)
    variables = batchnorm.init(jax.random.key(1), x, train=True)
    params = {"scale": jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, SHAPE[-1]), dtype),
              "bias": normal(3, (SHAPE[-1],), dtype)}
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
        weights = normal(4, SHAPE, jnp.float64)  # a loss that mixes every output

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


def test_bfloat16_batchnorm_keeps_float32_statistics_of_its_bf16_input():
    """A bf16 model's BatchNorm computes its batch moments in float32 from the bf16 input and keeps
    float32 running statistics (0.9 x old + 0.1 x batch, the variance unbiased), equal to numpy's
    float64 moments to float32 precision: moments rounded to bf16 would be off by up to 4e-3."""
    x = jnp.asarray(np.random.default_rng(0).normal(1, 3, SHAPE), jnp.bfloat16)
    batchnorm = BatchNorm(dtype=jnp.bfloat16)
    channels = SHAPE[-1]  # a fresh BatchNorm, written out (an eager init compiles op by op)
    variables = {"params": {"scale": np.ones(channels, np.float32), "bias": np.zeros(channels, np.float32)},
                 "batch_stats": {"mean": np.zeros(channels, np.float32), "var": np.ones(channels, np.float32)}}
    y, updates = jax.jit(lambda v, x: batchnorm.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    stats = updates["batch_stats"]
    assert {stats["mean"].dtype, stats["var"].dtype} == {jnp.dtype(jnp.float32)} and y.dtype == jnp.bfloat16
    values = np.asarray(x, np.float64)
    count = values.size // SHAPE[-1]
    mean, var = values.mean((0, 1, 2)), values.var((0, 1, 2))
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * count / (count - 1), rtol=1e-5)
    normalised = (values - mean) / np.sqrt(var + 1e-5)  # scale 1, bias 0
    np.testing.assert_allclose(np.asarray(y, np.float64), normalised, rtol=1e-2, atol=1e-2)  # bf16 output
