"""The data sets' raw files: each data set's reader, and a split read straight from them.

Raw reading parses the label files and checks every image cheaply (header and end
marker) when the split opens; images are decoded on access. `splits.open_split` prefers
the prepared (ArrayRecord) copy and falls back to `open_raw` here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from arm_jax.data import synthetic
from arm_jax.data.base import (SPLITS, ArraySplit, FileSplit, LabelledSplit, Problems, Records,
                               SplitReport)
from arm_jax.data.readers import affectnet, fer2013, folder, raf_db
from arm_jax.errors import UserError

log = logging.getLogger(__name__)


def _affectnet(num_classes: int):
    """The AffectNet reader for the 7- or 8-class protocol."""
    return lambda d, s, p, check: affectnet.read_affectnet(d, s, p, num_classes=num_classes,
                                                           check_images=check)


# name -> reader(data_dir, split, problems, check_images) -> Records
_READERS = {
    "fer2013": lambda d, s, p, check: fer2013.read_fer2013(d, s, p),
    "ferplus": lambda d, s, p, check: fer2013.read_ferplus(d, s, p),
    "fer2013_folder": lambda d, s, p, check: folder.read_fer2013_folder(d, s, p,
                                                                      check_images=check),
    "raf_db": lambda d, s, p, check: raf_db.read_raf_db(d, s, p, check_images=check),
    "affectnet7": _affectnet(7),
    "affectnet8": _affectnet(8),
    "folder": lambda d, s, p, check: folder.read_folder(d, s, p, check_images=check),
}
DATASETS = tuple(_READERS) + ("synthetic",)


def check_names(dataset: str, split: str) -> None:
    """UserError naming the allowed values if dataset or split is unknown."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def data_dir_of(dataset: str, data_dir: str | Path | None) -> Path:
    """data_dir as a Path; a UserError if it is missing for a data set that needs files."""
    if data_dir is None:
        raise UserError(f"dataset {dataset!r} needs --data-dir (the folder holding its files)")
    return Path(data_dir).expanduser()


def read_records(dataset: str, data_dir: Path, split: str, problems: Problems, *,
                 check_images: bool = True) -> Records:
    """A split's records from the raw files; bad records go to `problems`."""
    check_names(dataset, split)
    records = _READERS[dataset](data_dir, split, problems, check_images)
    if records.dropped:
        log.info("%s/%s: left out %d record(s): %s", dataset, split, records.dropped,
                 records.dropped_reason)
    return records


def open_raw(dataset: str, data_dir: str | Path | None, split: str, *, skip_bad: bool = False,
             image_size_hint: int | None = None) -> LabelledSplit:
    """A split read straight from the distributed files (no prepare needed)."""
    name = f"{dataset}/{split}"
    if dataset == "synthetic":
        return synthetic.SyntheticSplit(split)
    data_dir = data_dir_of(dataset, data_dir)
    problems = Problems(f"{name} in {data_dir}")
    records = read_records(dataset, data_dir, split, problems)
    report = SplitReport(problems.check(skip_bad=skip_bad), records.dropped,
                         records.dropped_reason)
    if records.images is not None:
        return ArraySplit(name, records.class_names, records.labels, records.images, report)
    if isinstance(records, affectnet.FaceRecords):
        return affectnet.FaceCropSplit(name, records.class_names, records.labels, records.root,
                                       records.paths, records.boxes, records.mode,
                                       image_size_hint, report)
    return FileSplit(name, records.class_names, records.labels, records.root, records.paths,
                     records.mode, image_size_hint, report)


# Data sets whose images come in many sizes: decoded straight to the model's input size.
# The others travel at their native size (FER 48 px, RAF-DB 100 px, AffectNet's face crops
# capped at affectnet.CROP_MAX_SIDE), so flip/noise happen there, as in the released code,
# and resizing follows (on the device, or on the host for mixed sizes).
VARIABLE_SIZE_DATASETS = ("folder",)


def decode_size_hint(dataset: str, image_size: int) -> int | None:
    """The `image_size_hint` to open `dataset` with for a model of `image_size`."""
    return image_size if dataset in VARIABLE_SIZE_DATASETS else None
