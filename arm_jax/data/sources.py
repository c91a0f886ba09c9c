"""open_split: any supported data set's split as a LabelledSplit, prepared or read raw.

Raw reading parses the label files and checks every image cheaply (header and end
marker) when the split opens; images are decoded on access. `arm-jax prepare` decodes
every image once, writes ArrayRecord files, and is then what open_split uses: faster to
open, uniform, and fully verified. Prepared data is only used while it matches the source
files' fingerprint; otherwise open_split reads the raw files (and logs that it does).
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
    return FileSplit(name, records.class_names, records.labels, records.root, records.paths,
                     records.mode, image_size_hint, report)


# Data sets whose images come in many sizes: decoded straight to the model's input size.
# The others travel at their native size (FER 48 px, RAF-DB 100 px), so flip/noise happen
# there, as in the released code, and resizing runs on the device.
VARIABLE_SIZE_DATASETS = ("affectnet7", "affectnet8", "folder")


def decode_size_hint(dataset: str, image_size: int) -> int | None:
    """The `image_size_hint` to open `dataset` with for a model of `image_size`."""
    return image_size if dataset in VARIABLE_SIZE_DATASETS else None


def open_split(dataset: str, data_dir: str | Path | None, split: str, *, skip_bad: bool = False,
               prepared: bool = True, image_size_hint: int | None = None,
               tfds_data_dir: str | Path | None = None) -> LabelledSplit:
    """A data set's split as a LabelledSplit.

    Args:
      dataset: one of DATASETS. "synthetic" ignores data_dir and needs no files.
      data_dir: the folder holding the data set as distributed.
      split: "train", "val" or "test". Data sets without a validation split (RAF-DB,
        AffectNet, the FER2013 folder release) give their test set for "val".
      skip_bad: leave out bad records (logged, and listed in `split.report`) instead of
        raising a DatasetError that lists them.
      prepared: use data written by `prepare` when it exists and matches the source files.
      image_size_hint: file-based splits resize images to this square size when decoding
        (AffectNet's images differ in size); array-backed splits keep their native size.
      tfds_data_dir: where prepared data lives (default: $TFDS_DATA_DIR, else TFDS's default).
    """
    check_names(dataset, split)
    if prepared and dataset != "synthetic":
        from arm_jax.data import prepared as prepared_  # imports tfds: slow, so only here

        split_ = prepared_.open_prepared(dataset, data_dir_of(dataset, data_dir), split,
                                             skip_bad=skip_bad, tfds_data_dir=tfds_data_dir,
                                             image_size_hint=image_size_hint)
        if split_ is not None:
            return split_
        log.info("%s: no current prepared data; reading the raw files (`arm-jax prepare` makes "
                 "opening faster and checks every image)", dataset)
    return open_raw(dataset, data_dir, split, skip_bad=skip_bad, image_size_hint=image_size_hint)
