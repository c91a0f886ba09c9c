"""Small ARM models: random ARMResNet18s for the export, predict and face-detection tests, and
`TinyARM`, the steps' contract at a fraction of the size, for the fast tier's step checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from arm_jax.models import ARM
from arm_jax.models.arm import torch_default_uniform
from arm_jax.models.batchnorm import BatchNorm
from arm_jax.models.resnet import BasicBlock, conv


EXPRESSIONS = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard normal test inputs drawn in numpy. jax.random.normal compiles a program per shape
    and dtype (0.3-1 s each on 2 cores, float64 most), which was most of these small tests' time."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def small_model(image_size: int = 64, seed: int = 0, calibrated: bool = True):
    """A random ARM model with random BatchNorm and GAR state, as a LoadedModel named after EXPRESSIONS.

    Values are drawn in numpy for the shapes jax.eval_shape gives (no compiled init: seconds faster),
    kernels at He scale; the classifier is then scaled so that logits spread by about 3 (measured on
    random images with onnxruntime), so that probabilities are neither uniform nor saturated.
    """
    import onnxruntime

    from arm_jax.interop.convert import expected_shapes
    from arm_jax.interop.export import build_onnx
    from arm_jax.interop.model_files import LoadedModel
    from arm_jax.models import ARMResNet18

    model = ARMResNet18(num_classes=len(EXPRESSIONS), image_size=image_size)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "'kernel'" in name:  # HWIO or (in, out): fan-in is all but the last axis
            return rng.normal(0, np.sqrt(2 / max(1, int(np.prod(shape.shape[:-1])))), shape.shape)
        if "'scale'" in name or "'alpha'" in name or "'var'" in name:
            return 0.5 + rng.random(shape.shape)
        if "'count'" in name:
            return np.asarray(5 if calibrated else 0, shape.dtype)
        return rng.normal(0, 0.2 if "'mean'" in name or "'bias'" in name else 1.0, shape.shape)

    variables = jax.tree_util.tree_map_with_path(
        lambda path, shape: np.asarray(draw(path, shape), shape.dtype), expected_shapes(model))
    loaded = LoadedModel(model, variables, EXPRESSIONS)
    if calibrated:
        session = onnxruntime.InferenceSession(build_onnx(loaded).SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        images = rng.integers(0, 256, (8, image_size, image_size, 3), dtype=np.uint8)
        logits = session.run(["logits"], {"image": images})[0] - variables["params"]["fc"]["bias"]
        variables["params"]["fc"]["kernel"] *= np.float32(3 / max(float(logits.std()), 1e-6))
    return loaded


def write_small_model(directory: Path, image_size: int = 64, seed: int = 0, calibrated: bool = True) -> Path:
    """`small_model` saved as a model directory (`arm-jax convert`'s format)."""
    from arm_jax.interop.model_files import save_model

    loaded = small_model(image_size, seed, calibrated)
    return save_model(directory, loaded.variables, loaded.model, loaded.class_names)



class TinyARM(nn.Module):
    """ARMResNet18 as the steps and the training loop see it, made of the same blocks, small.

    A stem conv + BatchNorm, one BasicBlock with its downsample projection (16 -> 4 px), the ARM
    head (arrangement 2x, a 4x4/2 De-albino kernel, BatchNorm, Sharing Affinity: a 3x3
    representation at 16 px) and the classifier: the same collections (params, batch_stats, gar),
    the same fields (ARMResNet18's architecture and runtime fields: the loop builds it as it builds
    ARMResNet18) and the same dtype rules (convolutions in `dtype`, statistics and logits in
    float32). Its training step compiles in a few seconds where ARMResNet18's takes ~20 s of CPU at
    any input size, so the fast tier checks the steps and the loop with it; the slow tier runs them
    on the full model.
    """

    num_classes: int = 7
    image_size: int = 16
    arrangement: bool = True
    de_albino: bool = True
    affinity: bool = True
    de_albino_kernel: int = 4
    de_albino_stride: int = 2
    raw_kernel: int = 3
    dropout_rate: float = 0.0
    gar_mode: str = "batch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(8, 3, 2, 1, self.dtype, self.param_dtype, "conv1")(x.astype(self.dtype))
        x = BatchNorm(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="bn1")(x, train=train)
        x = BasicBlock(16, 2, self.dtype, self.param_dtype, self.axis_name, name="layer1_0")(
            nn.relu(x), train=train)
        representation = ARM(arrangement=self.arrangement, de_albino=self.de_albino, affinity=self.affinity,
                             de_albino_kernel=self.de_albino_kernel, de_albino_stride=self.de_albino_stride,
                             raw_kernel=self.raw_kernel, arrangement_upscale=2, gar_mode=self.gar_mode,
                             axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="arm")(x, train=train)
        if self.dropout_rate > 0:
            representation = nn.Dropout(self.dropout_rate)(representation, deterministic=not train)
        fan_in = representation.shape[-1]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=torch_default_uniform(fan_in), bias_init=torch_default_uniform(fan_in),
                          name="fc")(representation)
        return logits.astype(jnp.promote_types(self.param_dtype, jnp.float32))


def tiny_arm_variables(model: TinyARM, seed=0) -> dict:
    """Fresh variables for `model` as numpy arrays: kernels He-normal, BatchNorm at (1, 0) with
    statistics (0, 1), alpha 1, a zero running GAR. Drawn in numpy (`seed`: anything
    np.random.default_rng takes) for the shapes jax.eval_shape gives: a compiled `init` spends
    ~15 s of CPU compiling its threefry draws (jax 0.10 on the CPU, jax_threefry_partitionable)."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "'kernel'" in name:  # HWIO or (in, out): fan-in is all but the last axis
            return rng.normal(0, np.sqrt(2 / max(1, int(np.prod(shape.shape[:-1])))), shape.shape)
        if "'scale'" in name or "'alpha'" in name or "'var'" in name:
            return np.ones(shape.shape)
        return np.zeros(shape.shape)

    return jax.tree_util.tree_map_with_path(lambda path, shape: np.asarray(draw(path, shape), shape.dtype), shapes)
