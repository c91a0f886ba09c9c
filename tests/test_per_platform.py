"""The model's one seam with the machine (arm_jax/models/per_platform.py): lowered for CUDA on
this CPU-only jaxlib, a convolution, the max pool and the whole training step carry only the
plain forms; lowered for the CPU, the forms XLA:CPU runs faster. The values are the same either
way (tests/test_conv.py, tests/test_pooling.py compare the forms)."""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.models import ARMResNet18, per_platform
from arm_jax.models.conv import cpu_conv, plain_conv
from arm_jax.models.pooling import max_pool as cpu_max_pool
from tests.small_models import normal

# What `platform_dependent` itself adds around the branch it keeps: the (one-branch) case ops,
# and, for a gradient, zero-filled stand-ins for the residuals of the branch it dropped.
SEAM_STRUCTURE = {"stablehlo.case", "stablehlo.return", "stablehlo.constant", "stablehlo.broadcast_in_dim"}


def _op_counts(module_text: str) -> Counter:
    """How often each StableHLO op occurs in a module's text, less the seam's own structure."""
    counts = Counter(re.findall(r"\b(stablehlo\.[a-z_]+)", module_text))
    for op in SEAM_STRUCTURE:
        counts.pop(op, None)
    return counts


def _gradient_ops(fn, shapes, platform: str) -> Counter:
    """The ops of fn's value-and-gradient (all arguments) lowered for `platform`."""
    def loss(*args):
        return jnp.sum(fn(*args) ** 2)

    gradient = jax.value_and_grad(loss, argnums=tuple(range(len(shapes))))
    return _op_counts(jax.jit(gradient).trace(*shapes).lower(lowering_platforms=(platform,)).as_text())


# Each case takes one of cpu_conv's forms: (input shape, kernel shape, stride, padding, dtype).
CONV_CASES = {
    "float64 (tap matmul)": ((2, 9, 9, 8), (3, 3, 8, 4), 2, 1, jnp.float64),
    "2x2 map (patches matmul)": ((2, 2, 2, 128), (3, 3, 128, 8), 1, 1, jnp.float32),
    "3x3 stride 2 at 48 px (polyphase gradient)": ((2, 48, 48, 4), (3, 3, 4, 8), 2, 1, jnp.float32),
    "1x1 stride 2 at 48 px (matmul filter gradient)": ((2, 48, 48, 4), (1, 1, 4, 8), 2, 0, jnp.float32),
    "3x3 stride 1 (barrier only)": ((2, 12, 12, 4), (3, 3, 4, 8), 1, 1, jnp.float32),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_lowers_to_the_plain_conv_for_cuda_and_to_its_cpu_form_for_the_cpu(case):
    x_shape, kernel_shape, stride, padding, dtype = CONV_CASES[case]
    with jax.enable_x64(dtype == jnp.float64):
        shapes = (jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(kernel_shape, dtype))

        def ops(conv, platform):
            return _gradient_ops(lambda x, k: conv(x, k, stride, padding), shapes, platform)

        assert ops(per_platform.conv, "cuda") == ops(plain_conv, "cuda")
        assert ops(per_platform.conv, "cpu") == ops(cpu_conv, "cpu")
        assert ops(cpu_conv, "cpu") != ops(plain_conv, "cpu")  # the case does take a CPU form


def test_max_pool_lowers_to_reduce_window_for_cuda_and_to_its_cpu_form_for_the_cpu():
    shapes = (jax.ShapeDtypeStruct((2, 9, 9, 8), jnp.float32),)

    def ops(pool, platform):
        return _gradient_ops(lambda x: pool(x, 3, 2, 1), shapes, platform)

    assert ops(per_platform.max_pool, "cuda") == ops(per_platform.plain_max_pool, "cuda")
    assert ops(per_platform.max_pool, "cpu") == ops(cpu_max_pool, "cpu")
    assert ops(cpu_max_pool, "cpu") != ops(per_platform.plain_max_pool, "cpu")


def _grouped_convolutions(module_text: str) -> int:
    """Convolutions with feature_group_count > 1: the plain model has none; the patches form
    (jax.lax.conv_general_dilated_patches, used for XLA:CPU's 2x2 maps) is one."""
    return sum(int(count) > 1 for count in re.findall(r"feature_group_count = (\d+)", module_text))


def test_training_step_exported_for_cuda_on_this_cpu_carries_no_cpu_form():
    """The real training step at 64 px (layer4's 2x2 maps take the patches form on the CPU),
    exported with jax.export for CUDA and for the CPU on this CPU-only jaxlib."""
    from arm_jax.interop.pretrained import init_variables
    from arm_jax.training.config import TrainConfig
    from arm_jax.training.optim import make_optimizer
    from arm_jax.training.state import TrainState
    from arm_jax.training.steps import make_train_step

    size, batch = 64, 2
    model = ARMResNet18(num_classes=7, image_size=size)
    tx = make_optimizer(TrainConfig(), steps_per_epoch=10)
    state = jax.eval_shape(lambda: TrainState.create(init_variables(model, jax.random.key(0)), tx))
    images = {"image": jax.ShapeDtypeStruct((batch, 48, 48, 1), jnp.uint8),
              "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
              "epoch": jax.ShapeDtypeStruct((batch,), jnp.int32), "position": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    rng = jax.eval_shape(lambda: jax.random.key(1))
    train_step = make_train_step(model, tx)
    texts = {}
    for platform in ("cuda", "cpu"):
        exported = jax.export.export(jax.jit(train_step), platforms=[platform])(state, images, rng)
        assert exported.platforms == (platform,)
        texts[platform] = exported.mlir_module()
    ops = {platform: _op_counts(text) for platform, text in texts.items()}

    # jax.checkpoint puts one barrier on the recomputation in each BatchNorm (batchnorm.py):
    # a portable remat. The CPU form adds one on each convolution's input (conv.py `materialized`).
    batchnorms = len(jax.tree.leaves(state.batch_stats)) // 2  # a mean and a variance each
    assert ops["cuda"]["stablehlo.optimization_barrier"] == batchnorms
    assert ops["cpu"]["stablehlo.optimization_barrier"] > batchnorms
    assert _grouped_convolutions(texts["cuda"]) == 0
    assert _grouped_convolutions(texts["cpu"]) > 0
    # The plain max pool's gradient is XLA's select-and-scatter; the CPU form's is pads and adds.
    assert ops["cuda"]["stablehlo.select_and_scatter"] == 1
    assert ops["cpu"]["stablehlo.select_and_scatter"] == 0


def test_conv_and_pool_under_vmap_and_shard_map_equal_the_direct_call():
    """The seam under the transformations the model may meet: vmap of the gradient (each example
    as its own call: the CPU forms' custom gradients and barriers under batching), and shard_map."""
    from jax.sharding import Mesh, PartitionSpec

    x = normal(0, (3, 1, 48, 48, 2))  # 3 calls of batch 1, 48 px: polyphase
    kernel = normal(1, (3, 3, 2, 4))

    def loss(x, kernel):
        y = per_platform.conv(x, kernel, 2, 1)
        return jnp.sum(per_platform.max_pool(y, 3, 2, 1) ** 2)

    gradient = jax.jit(jax.grad(loss, argnums=(0, 1)))
    one_by_one = [gradient(x[i], kernel) for i in range(3)]
    vmapped = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, kernel)
    for i, (x_grad, kernel_grad) in enumerate(one_by_one):
        np.testing.assert_allclose(vmapped[0][i], x_grad, rtol=1e-5, atol=1e-5 * float(jnp.abs(x_grad).max()))
        np.testing.assert_allclose(vmapped[1][i], kernel_grad, rtol=1e-5, atol=1e-5 * float(jnp.abs(kernel_grad).max()))

    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    sharded = jax.jit(jax.shard_map(lambda x, kernel: jax.grad(loss)(x, kernel), mesh=mesh,
                                    in_specs=(PartitionSpec("batch"), PartitionSpec()),
                                    out_specs=PartitionSpec("batch")))
    np.testing.assert_array_equal(sharded(x[0], kernel), one_by_one[0][0])
