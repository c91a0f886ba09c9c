"""AffectNet, in both layouts seen in the wild: the official CSV lists and the npy re-release.

Images are used as distributed, not cropped to face_x/y/width/height: the manually
annotated images already are face crops (the box covers nearly all of each image), and
ARM-style training code, like most AffectNet code, feeds them as they are.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from arm_jax.data.base import IMAGE_SUFFIXES, Problems, Records, check_image_paths
from arm_jax.data.readers import require
from arm_jax.errors import DatasetError

CLASS_NAMES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
               "contempt")
ALL_CODES = 11  # 8 emotions, then 8 None, 9 Uncertain, 10 No-Face
LIST_DIR = Path("Manually_Annotated_file_lists")
IMAGE_DIR = Path("Manually_Annotated_Images")
# AffectNet's validation set is the test set of every paper (the real test set is private).
CSV_FILE = {"train": "training.csv", "val": "validation.csv", "test": "validation.csv"}
NPY_DIR = {"train": "train_set", "val": "val_set", "test": "val_set"}
HOW_TO_GET = "AffectNet is distributed by its authors on request."
LAYOUT = ("  DATA_DIR/Manually_Annotated_file_lists/training.csv, validation.csv\n"
          "  DATA_DIR/Manually_Annotated_Images/<subDirectory_filePath>\n"
          "or the re-release:\n"
          "  DATA_DIR/train_set/images/N.jpg, DATA_DIR/train_set/annotations/N_exp.npy\n"
          "  DATA_DIR/val_set/images/..., DATA_DIR/val_set/annotations/...")


def layout_of(data_dir: Path) -> str:
    """'csv' (official lists) or 'npy' (re-release), by which folders exist."""
    if (data_dir / LIST_DIR).is_dir():
        return "csv"
    if (data_dir / "train_set").is_dir() or (data_dir / "val_set").is_dir():
        return "npy"
    require(data_dir / LIST_DIR, "affectnet", HOW_TO_GET, LAYOUT)  # raises: neither is there
    return "csv"


def _code(text: str, where, problems) -> int | None:
    """The expression code 0..10 in text, or None (recorded as a bad record)."""
    if text.isdigit() and int(text) < ALL_CODES:
        return int(text)
    problems.add(*where, f"unknown expression {text!r} (expected 0..{ALL_CODES - 1})")
    return None


def _read_csv(data_dir, split, num_classes, problems):
    """(paths relative to data_dir, labels, wheres, dropped) from the official CSV lists."""
    path = require(data_dir / LIST_DIR / CSV_FILE[split], "affectnet", HOW_TO_GET, LAYOUT)
    paths, labels, wheres, dropped = [], [], [], 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        needed = ("subDirectory_filePath", "expression")
        if any(name not in header for name in needed):
            raise DatasetError(f"{path}:1: header must have columns {', '.join(needed)} "
                               f"(found {', '.join(header)})")
        file_col, label_col = header.index(needed[0]), header.index(needed[1])
        for row in reader:
            where = (path, reader.line_num)
            if len(row) != len(header):
                problems.add(*where, f"{len(row)} fields, expected {len(header)}")
                continue
            label = _code(row[label_col].strip(), where, problems)
            if label is None:
                continue
            if label >= num_classes:  # the protocol's drop, not bad input
                dropped += 1
                continue
            paths.append(os.path.join(IMAGE_DIR, row[file_col].strip()))
            labels.append(label)
            wheres.append(where)
    return paths, labels, wheres, dropped


def _read_npy(data_dir, split, num_classes, problems):
    """(paths, labels, wheres, dropped) from the re-release's images/ and annotations/N_exp.npy."""
    split_dir = require(data_dir / NPY_DIR[split], "affectnet", HOW_TO_GET, LAYOUT)
    images = require(split_dir / "images", "affectnet", HOW_TO_GET, LAYOUT)
    paths, labels, wheres, dropped = [], [], [], 0
    for name in sorted(os.listdir(images)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        npy = split_dir / "annotations" / f"{Path(name).stem}_exp.npy"
        try:
            # Annotations are small arrays holding the code (often as a string, e.g. '3').
            text = str(np.load(npy, allow_pickle=False).reshape(-1)[0]).strip()
        except FileNotFoundError:
            problems.add(npy, None, f"annotation file is missing for {images / name}")
            continue
        except (ValueError, OSError, IndexError) as e:
            problems.add(npy, None, f"annotation file cannot be read ({e})")
            continue
        label = _code(text, (npy, None), problems)
        if label is None:
            continue
        if label >= num_classes:
            dropped += 1
            continue
        paths.append(f"{NPY_DIR[split]}/images/{name}")
        labels.append(label)
        wheres.append((images / name, None))
    return paths, labels, wheres, dropped


def read_affectnet(data_dir: Path, split: str, problems: Problems, *, num_classes: int,
                   check_images: bool = True) -> Records:
    """AffectNet with 7 (codes 0-6) or 8 (codes 0-7) classes; val is the validation set = test."""
    if num_classes not in (7, 8):
        raise ValueError(f"num_classes must be 7 or 8, not {num_classes}")
    read = _read_csv if layout_of(data_dir) == "csv" else _read_npy
    paths, labels, wheres, dropped = read(data_dir, split, num_classes, problems)
    keep = check_image_paths(data_dir, paths, wheres, problems, check_content=check_images)
    return Records(CLASS_NAMES[:num_classes], np.asarray(labels, np.int32)[keep], root=data_dir,
                   paths=[p for p, k in zip(paths, keep) if k], mode="RGB", dropped=dropped,
                   dropped_reason=f"expression codes {num_classes}..10 are not in the "
                                  f"{num_classes}-class protocol")
