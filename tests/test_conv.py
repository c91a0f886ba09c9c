"""Convolutions written another way (custom gradients, float64 tap products) equal the plain
convolution and its jax.grad (float64); the barrier on convolution inputs keeps XLA:CPU from
recomputing them inside the filter gradients' transposes."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.models.conv import plain_conv, polyphase_input_grad, strided_conv, tap_matmul_conv
from tests.small_models import normal

# (height, width, kernel, stride, padding): ResNet-18's strided convs (3x3/2 pad 1, 1x1/2)
# at odd and even sides, plus a stride 3 and a kernel smaller than its stride (phases without taps).
# The fast tier runs the 3x3/2 and the phases without taps; the slow tier adds the rest (3-4 s each).
SLOW = pytest.mark.slow
CASES = [(9, 8, 3, 2, 1), pytest.param(9, 8, 1, 2, 0, marks=SLOW), pytest.param(10, 11, 5, 3, 2, marks=SLOW),
         (6, 6, 2, 3, 0)]


def _relative(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))


def _inputs(seed: int, height: int, width: int, kernel_size: int, stride: int, padding: int):
    """float64 input (2, H, W, 3), kernel (k, k, 3, 4) and an output gradient; call under enable_x64."""
    x = normal(seed, (2, height, width, 3), jnp.float64)
    kernel = normal(seed + 1, (kernel_size, kernel_size, 3, 4), jnp.float64)
    out = jax.eval_shape(lambda x, kernel: plain_conv(x, kernel, stride, padding), x, kernel)
    grad = normal(seed + 2, out.shape, jnp.float64)
    return x, kernel, grad


@pytest.mark.parametrize(("height", "width", "kernel_size", "stride", "padding"), CASES)
def test_custom_gradients_equal_plain_conv_gradients(height, width, kernel_size, stride, padding):
    with jax.enable_x64(True):
        x, kernel, grad = _inputs(height * 31 + kernel_size, height, width, kernel_size, stride, padding)

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


# ResNet-18's float64 shapes: conv1 (7x7/2 pad 3), 3x3/1 and /2 pad 1, the 1x1/2 projection;
# odd and even sides.
TAP_CASES = [(11, 10, 7, 2, 3), (5, 5, 3, 1, 1), pytest.param(9, 8, 3, 2, 1, marks=SLOW),
             pytest.param(9, 8, 1, 2, 0, marks=SLOW)]


@pytest.mark.parametrize(("height", "width", "kernel_size", "stride", "padding"), TAP_CASES)
def test_tap_matmul_conv_and_its_gradients_equal_the_plain_conv(height, width, kernel_size, stride, padding):
    with jax.enable_x64(True):
        x, kernel, grad = _inputs(height * 17 + kernel_size, height, width, kernel_size, stride, padding)

        @jax.jit
        def both(x, kernel, grad):
            out, plain_vjp = jax.vjp(lambda x, k: plain_conv(x, k, stride, padding), x, kernel)
            taps_out, taps_vjp = jax.vjp(lambda x, k: tap_matmul_conv(x, k, stride, padding), x, kernel)
            return out, taps_out, plain_vjp(grad), taps_vjp(grad)

        out, taps_out, (want_x, want_k), (got_x, got_k) = both(x, kernel, grad)
        assert taps_out.shape == out.shape
        assert _relative(taps_out, out) <= 1e-12
        assert _relative(got_x, want_x) <= 1e-12
        assert _relative(got_k, want_k) <= 1e-12


# ---- the barrier on convolution inputs (models/conv.py `materialized`) ------------------

def _fused_computations(hlo_text: str) -> dict[str, list[str]]:
    """Optimized HLO text -> {fused computation name: its instruction lines}."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"%(fused_computation[\w.]*) ", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            computations[name].append(line)
    return computations


def _recomputing_batch_minor_transposes(hlo_text: str) -> list[set[str]]:
    """The opcodes of each fused computation that transposes an NHWC map to (C, H, W, N), the
    filter gradient's layout, and also computes (multiply, add, ...) instead of only moving data."""
    moves = {"parameter", "transpose", "copy", "bitcast", "reshape", "constant"}
    found = []
    for lines in _fused_computations(hlo_text).values():
        if any(" transpose(" in line and "dimensions={3,1,2,0}" in line for line in lines):
            ops = {match.group(1) for line in lines if (match := re.search(r" = \S+ ([a-z][\w-]*)\(", line))}
            if ops - moves:
                found.append(ops)
    return found


@pytest.fixture
def without_compilation_cache():
    """JAX's persistent compilation cache (which the suite turns on) off for the test: the
    training options split the temporaries into blocks only without it."""
    from jax.experimental.compilation_cache import compilation_cache

    folder = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()  # JAX reads the setting once: make it read it again
    yield
    jax.config.update("jax_compilation_cache_dir", folder)
    compilation_cache.reset_cache()


@pytest.fixture
def tuning_on(monkeypatch):
    """The training options as arm-jax gives them by default, also in a session run with
    ARM_JAX_XLA_CPU_TUNING=0 (which turns them off: training_compiler_options() is then None)."""
    from arm_jax.xla_flags import TUNING_ENV

    monkeypatch.delenv(TUNING_ENV, raising=False)


def test_filter_gradients_transpose_stored_inputs_and_give_the_same_gradients(without_compilation_cache, tuning_on):
    """Two residual blocks' training gradient on the CPU: compiled with the training options, no
    transpose recomputes BatchNorm/ReLU (the barrier holds); compiled without, XLA fuses them into
    the transposes (so this check can fail). The gradients are bitwise the same either way."""
    from arm_jax.models.resnet import BasicBlock
    from arm_jax.xla_flags import TEMP_BLOCK_BYTES, training_compiler_options

    class TwoBlocks(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = BasicBlock(16, 1, jnp.float32, jnp.float32, None, name=f"block{i}")(x, train=True)
            return x

    model = TwoBlocks()
    x = normal(0, (4, 12, 12, 16))
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(out**2)

    gradient = jax.grad(loss)

    options = training_compiler_options(TEMP_BLOCK_BYTES)  # all the options, temporaries in blocks too
    assert options is not None  # the CPU backend
    with_barriers = jax.jit(gradient, compiler_options=options).lower(variables["params"]).compile()
    without = jax.jit(gradient).lower(variables["params"]).compile()
    assert _recomputing_batch_minor_transposes(with_barriers.as_text()) == []
    assert _recomputing_batch_minor_transposes(without.as_text()) != []
    jax.tree.map(np.testing.assert_array_equal, with_barriers(variables["params"]), without(variables["params"]))


def test_training_compiler_options_follow_the_tuning_switch(monkeypatch, without_compilation_cache):
    from arm_jax.models.resnet import largest_activation_bytes
    from arm_jax.xla_flags import BARRIER_EXPANDER_PASS, TEMP_BLOCK_BYTES, TUNING_ENV, training_compiler_options

    monkeypatch.delenv(TUNING_ENV, raising=False)
    barrier = {"xla_disable_hlo_passes": BARRIER_EXPANDER_PASS}
    blocks = {**barrier, "xla_multiheap_size_constraint_per_heap": str(TEMP_BLOCK_BYTES)}
    assert training_compiler_options() == barrier
    assert training_compiler_options(TEMP_BLOCK_BYTES) == blocks
    assert training_compiler_options(TEMP_BLOCK_BYTES + 1) == barrier  # a larger intermediate: one block
    # The 112 px step at batch 32 (25.7 MB stem activations) gets blocks, 224 px (102.8 MB) does not.
    assert training_compiler_options(largest_activation_bytes(32, 112)) == blocks
    assert training_compiler_options(largest_activation_bytes(32, 224)) == barrier
    jax.config.update("jax_compilation_cache_dir", "/a/cache")  # its executables could not be cached
    assert training_compiler_options(TEMP_BLOCK_BYTES) == barrier
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(TUNING_ENV, "0")
    assert training_compiler_options() is None


def _temp_blocks(dump_folder) -> list[int]:
    """The sizes of the preallocated temporary blocks in XLA's buffer-assignment dump."""
    (assignment,) = dump_folder.glob("*buffer-assignment.txt")
    return [int(size) for size in re.findall(r"^allocation \d+: size (\d+), preallocated-temp", assignment.read_text(),
                                            re.MULTILINE)]


def test_training_options_split_the_temporaries_into_blocks_glibc_keeps(tmp_path, without_compilation_cache,
                                                                      tuning_on):
    """A program with ~110 MB of temporaries (three chained 2048x2048 matrix products and their
    gradient, 16 MB intermediates): compiled as XLA does by default, one block above
    TEMP_BLOCK_BYTES, which glibc would map and unmap on every call; with the training options,
    several blocks, none larger."""
    from arm_jax.xla_flags import TEMP_BLOCK_BYTES, training_compiler_options

    def loss(x):
        a = jnp.sin(x @ x)
        b = jnp.cos(a @ x)
        return jnp.sum(jnp.tanh(b @ a) @ b + a)

    matrix = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
    blocks = {}
    for name, options in (("default", {}), ("training", training_compiler_options(4 * 2048 * 2048))):
        folder = tmp_path / name
        jax.jit(jax.grad(loss)).lower(matrix).compile(compiler_options={**options, "xla_dump_to": str(folder)})
        blocks[name] = _temp_blocks(folder)
    assert len(blocks["default"]) == 1 and blocks["default"][0] > TEMP_BLOCK_BYTES
    assert len(blocks["training"]) > 1 and max(blocks["training"]) <= TEMP_BLOCK_BYTES
    assert sum(blocks["training"]) >= blocks["default"][0]
