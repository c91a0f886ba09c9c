"""ARMResNet18: the ResNet-18 backbone, the ARM head and the linear classifier."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from arm_jax.models.arm import ARM, GAR_MODES, torch_default_uniform
from arm_jax.models.resnet import STAGE_WIDTHS, ResNet18Backbone, backbone_output_side

# Fields that describe the network itself (saved with checkpoints); the rest
# (gar_mode, dtype, param_dtype, axis_name) say how to run it.
ARCHITECTURE_FIELDS = (
    "num_classes",
    "image_size",
    "arrangement",
    "de_albino",
    "affinity",
    "de_albino_kernel",
    "de_albino_stride",
    "raw_kernel",
    "dropout_rate",
)


class ARMResNet18(nn.Module):
    """ResNet-18 whose global pooling is replaced by ARM (Shi & Zhu), as in the released code.

    `apply(variables, x, train=...)` takes float NHWC images normalised with
    ImageNet mean/std and returns float32 logits. `variables` holds `params`,
    `batch_stats` and `gar` (the running global average representation).
    With all three switches off it is torchvision's resnet18 classifier.
    """

    num_classes: int
    image_size: int = 224
    arrangement: bool = True
    de_albino: bool = True
    affinity: bool = True
    de_albino_kernel: int = 32
    de_albino_stride: int = 8
    raw_kernel: int = 3
    dropout_rate: float = 0.0
    gar_mode: str = "batch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self):
        super().__post_init__()
        validate_architecture(self)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        expected = (self.image_size, self.image_size, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ARMResNet18(image_size={self.image_size}) expects input (N, {expected}), got {x.shape}")
        features = ResNet18Backbone(self.dtype, self.param_dtype, self.axis_name, name="backbone")(x, train=train)
        representation = ARM(
            arrangement=self.arrangement,
            de_albino=self.de_albino,
            affinity=self.affinity,
            de_albino_kernel=self.de_albino_kernel,
            de_albino_stride=self.de_albino_stride,
            raw_kernel=self.raw_kernel,
            gar_mode=self.gar_mode,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="arm",
        )(features, train=train)
        if self.dropout_rate > 0:
            representation = nn.Dropout(self.dropout_rate)(representation, deterministic=not train)
        fan_in = representation.shape[-1]
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_uniform(fan_in),
            bias_init=torch_default_uniform(fan_in),
            name="fc",
        )(representation)
        return logits.astype(jnp.promote_types(self.param_dtype, jnp.float32))


def head_geometry(model: ARMResNet18) -> dict[str, int]:
    """Map sides along the head for this input size; raises ValueError when impossible."""
    side = backbone_output_side(model.image_size)
    geometry = {"backbone_side": side}
    if model.arrangement:
        arranged = side * 16
        kernel, stride = model.de_albino_kernel, model.de_albino_stride
        geometry["arranged_side"] = arranged
        geometry["arranged_channels"] = STAGE_WIDTHS[-1] // 256
    else:
        arranged, kernel, stride = side, model.raw_kernel, 1
    if model.de_albino or model.arrangement:
        if kernel > arranged:
            raise ValueError(
                f"image_size {model.image_size} gives a {arranged}x{arranged} map at the De-albino block, "
                f"smaller than its {kernel}x{kernel} kernel; use a larger image size or a smaller kernel"
            )
        geometry["representation_side"] = (arranged - kernel) // stride + 1
    return geometry


def validate_architecture(model: ARMResNet18) -> None:
    """Reject impossible settings at construction, naming the field."""
    if model.num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {model.num_classes}")
    if model.image_size < 1:
        raise ValueError(f"image_size must be positive, got {model.image_size}")
    if model.gar_mode not in GAR_MODES:
        raise ValueError(f"gar_mode must be one of {', '.join(GAR_MODES)}, got {model.gar_mode!r}")
    for field in ("de_albino_kernel", "de_albino_stride", "raw_kernel"):
        if getattr(model, field) < 1:
            raise ValueError(f"{field} must be positive, got {getattr(model, field)}")
    if not 0.0 <= model.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {model.dropout_rate}")
    head_geometry(model)


def architecture(model: ARMResNet18) -> dict[str, Any]:
    """The JSON-able fields that define the network; `ARMResNet18(**architecture(m))` rebuilds it."""
    return {field: getattr(model, field) for field in ARCHITECTURE_FIELDS}


def with_runtime(model: ARMResNet18, **changes: Any) -> ARMResNet18:
    """The same network run differently (gar_mode, dtype, param_dtype, axis_name)."""
    unknown = set(changes) - {"gar_mode", "dtype", "param_dtype", "axis_name"}
    if unknown:
        raise ValueError(f"not runtime fields: {sorted(unknown)}")
    return dataclasses.replace(model, **changes)
