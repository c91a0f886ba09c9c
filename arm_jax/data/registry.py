"""The data sets arm-jax reads: one `DatasetSpec` per `--dataset` name, all it knows of each.

A spec says how to read the distributed files (`read`, giving a split's `Records`), which
files make the fingerprint that keeps prepared data current (`source_files`), how `prepare`
stores the images (`stored_pixels`, `builder`), whether the images come in many sizes
(`variable_size`), and how to get the data set (`how_to_get`). Adding a data set is one
`register(DatasetSpec(...))`: here for a built-in one, or in your own code before you open
it (grain worker processes started by spawn import this module afresh: register yours in a
module they import too, or read with 0 workers). `synthetic` is built in apart: it reads no
files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from arm_jax.data.base import Problems, Records
from arm_jax.data.readers import affectnet, fer2013, folder, raf_db
from arm_jax.errors import UserError

# The built-in data set that needs no files (arm_jax.data.synthetic).
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One data set as distributed."""

    name: str  # its --dataset name
    # (data_dir, split, problems, check_images) -> the split's Records; bad records go to problems
    read: Callable[[Path, str, Problems, bool], Records]
    # data_dir -> (files hashed by content, folders whose files count by name, size and mtime)
    source_files: Callable[[Path], tuple[list[Path], list[Path]]]
    # The TFDS builder family `prepare` writes it with (its folder under $TFDS_DATA_DIR).
    builder: str = "arm_folder"
    # Prepared images: decoded uint8 of this shape, or None: the file's own bytes (or a JPEG of
    # the face crop at tfds_builders.CROP_SIDE where the reader gives boxes).
    stored_pixels: tuple[int, ...] | None = None
    # Images of many sizes: decoded straight to the model's size (the others travel at their
    # native size, so flip and noise happen there, as in the released code).
    variable_size: bool = False
    how_to_get: str = ""


_SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a data set; its name must be new."""
    if spec.name in _SPECS or spec.name == SYNTHETIC:
        raise ValueError(f"a data set named {spec.name!r} is registered already")
    _SPECS[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Every --dataset name, in registration order, `synthetic` last."""
    return (*_SPECS, SYNTHETIC)


def spec(name: str) -> DatasetSpec:
    """The spec of data set `name`; a UserError naming the choices for an unknown one."""
    if name not in _SPECS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(names())}")
    return _SPECS[name]


# ---- the built-in data sets --------------------------------------------------------------------

def _affectnet_files(data_dir: Path) -> tuple[list[Path], list[Path]]:
    if affectnet.layout_of(data_dir) == "csv":
        lists = data_dir / affectnet.LIST_DIR
        return [lists / "training.csv", lists / "validation.csv"], [data_dir / affectnet.IMAGE_DIR]
    return [], [data_dir / "train_set", data_dir / "val_set"]


register(DatasetSpec(
    "fer2013", lambda d, s, p, check: fer2013.read_fer2013(d, s, p),
    lambda d: ([fer2013.find_csv(d)], []), builder="arm_fer2013",
    stored_pixels=(fer2013.SIDE, fer2013.SIDE, 1), how_to_get=fer2013.HOW_TO_GET))
register(DatasetSpec(
    "ferplus", lambda d, s, p, check: fer2013.read_ferplus(d, s, p),
    lambda d: ([fer2013.find_csv(d), d / "fer2013new.csv"], []), builder="arm_fer2013",
    stored_pixels=(fer2013.SIDE, fer2013.SIDE, 1), how_to_get=fer2013.FERPLUS_HOW_TO_GET))
register(DatasetSpec(
    "fer2013_folder", lambda d, s, p, check: folder.read_fer2013_folder(d, s, p, check_images=check),
    lambda d: ([], [d / "train", d / "test"]), builder="arm_fer2013",
    how_to_get=folder.FER_FOLDER_HOW_TO_GET))
register(DatasetSpec(
    "raf_db", lambda d, s, p, check: raf_db.read_raf_db(d, s, p, check_images=check),
    lambda d: ([d / raf_db.LABEL_FILE], [d / raf_db.IMAGE_DIR]), builder="arm_raf_db",
    how_to_get=raf_db.HOW_TO_GET))
for _classes in (7, 8):
    register(DatasetSpec(
        f"affectnet{_classes}",
        lambda d, s, p, check, classes=_classes: affectnet.read_affectnet(d, s, p, num_classes=classes,
                                                                          check_images=check),
        _affectnet_files, builder="arm_affectnet", how_to_get=affectnet.HOW_TO_GET))
register(DatasetSpec(
    "folder", lambda d, s, p, check: folder.read_folder(d, s, p, check_images=check),
    lambda d: ([], [d]), builder="arm_folder", variable_size=True,
    how_to_get="A labelled image folder of your own."))
