"""Models: the Flax ResNet-18 backbone and the ARM classifier."""

from arm_jax.models.arm import ARM, GAR_MODES, DeAlbino, SharingAffinity, pixel_shuffle
from arm_jax.models.classifier import ARCHITECTURE_FIELDS, ARMResNet18, architecture, head_geometry, with_runtime
from arm_jax.models.resnet import ResNet18Backbone

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ARM",
    "ARMResNet18",
    "DeAlbino",
    "GAR_MODES",
    "ResNet18Backbone",
    "SharingAffinity",
    "architecture",
    "head_geometry",
    "pixel_shuffle",
    "with_runtime",
]
