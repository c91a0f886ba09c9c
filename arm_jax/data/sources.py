"""The data sets' raw files: each data set's reader, and a split read straight from them.

Raw reading parses the label files and checks every image cheaply (header and end
marker) when the split opens; images are decoded on access. `splits.open_split` prefers
the prepared (ArrayRecord) copy and falls back to `open_raw` here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from arm_jax.data import registry, synthetic
from arm_jax.data.base import (SPLITS, ArraySplit, FileSplit, LabelledSplit, Problems, Records,
                               SplitReport)
from arm_jax.data.readers import affectnet
from arm_jax.errors import UserError

log = logging.getLogger(__name__)


# Every --dataset name (the built-in ones; data/registry.py adds more at run time).
DATASETS = registry.names()


def check_names(dataset: str, split: str) -> None:
    """UserError naming the allowed values if dataset or split is unknown."""
    if dataset != registry.SYNTHETIC:
        registry.spec(dataset)  # a UserError naming the choices
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
    records = registry.spec(dataset).read(data_dir, split, problems, check_images)
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


def decode_size_hint(dataset: str, image_size: int) -> int | None:
    """The `image_size_hint` to open `dataset` with for a model of `image_size`: the model's size
    for data sets whose images come in many sizes (DatasetSpec.variable_size), else None."""
    if dataset == registry.SYNTHETIC:
        return None
    return image_size if registry.spec(dataset).variable_size else None
