"""The data sets as random-access splits, and the grain loader over them.

    from arm_jax.data import open_split, make_loader
    split = open_split("raf_db", "data/RAF-DB", "train")   # len(split), split.class_names, split.labels
    record = split[0]                                      # {'image': uint8 HxWxC, 'label': int32}
    loader = make_loader(split, batch_size=64, seed=0, epoch=0, train=True, image_size=224)

Names resolve on first use, so `import arm_jax.data` stays cheap (no JAX, grain or TFDS).
"""

import importlib

_PUBLIC = {
    "open_split": "arm_jax.data.splits",
    "make_loader": "arm_jax.data.pipeline",
    "steps_in_epoch": "arm_jax.data.pipeline",
    "DATASETS": "arm_jax.data.sources",
    "decode_size_hint": "arm_jax.data.sources",
    "prepare": "arm_jax.data.prepared",
    "CANONICAL": "arm_jax.data.classes",
    "canonical_name": "arm_jax.data.classes",
    "dataset_classes": "arm_jax.data.classes",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'arm_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
