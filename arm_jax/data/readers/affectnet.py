"""AffectNet, in both layouts seen in the wild: the official CSV lists and the npy re-release.

The CSV layout gives a face box per row (face_x, face_y, face_width, face_height); the
images around it carry a margin (about 13% of the side: rows read `134,134,899,899`),
and one file can be listed twice with two boxes. A record is therefore the box's content,
clipped to the image, not the file: loaders that reproduce AffectNet results crop first.
A crop larger than CROP_MAX_SIDE is downscaled to it (keeping its aspect) before anything
else, so flip/noise run at a bounded size. The re-release's images are crops already.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from arm_jax.data.base import (IMAGE_SUFFIXES, FileSplit, Problems, Records, SplitReport,
                               check_image_paths, contained_path, decode_image, resize_uint8)
from arm_jax.data.classes import dataset_classes
from arm_jax.data.readers import require
from arm_jax.errors import DatasetError

CLASS_NAMES = dataset_classes("affectnet8")  # neutral, happiness, sadness, surprise, ...
BOX_COLUMNS = ("face_x", "face_y", "face_width", "face_height")
# Crops above this side are downscaled to it first (the model reads 224 px; AffectNet's
# boxes reach thousands of pixels, and flip/noise/resize at that size would dominate).
CROP_MAX_SIDE = 256
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
    if text.isascii() and text.isdigit() and int(text) < ALL_CODES:  # not '²'
        return int(text)
    problems.add(*where, f"unknown expression {text!r} (expected 0..{ALL_CODES - 1})")
    return None


@dataclasses.dataclass
class FaceRecords(Records):
    """Records of the CSV layout: each path comes with its face box (x, y, width, height)."""

    boxes: np.ndarray | None = None  # int64 (N, 4)


def _box(row, columns, where, problems) -> tuple[int, int, int, int] | None:
    """The row's face box, or None (recorded as a bad record) if it is not a valid box."""
    texts = [row[c].strip() for c in columns]
    try:
        x, y, width, height = (int(t) for t in texts)  # the released lists hold whole pixels
    except ValueError:
        problems.add(*where, f"invalid face box {','.join(texts)} (x,y,width,height must be "
                             "whole numbers)")
        return None
    if width <= 0 or height <= 0:
        problems.add(*where, f"invalid face box {x},{y},{width},{height} (width and height "
                             "must be positive)")
        return None
    return x, y, width, height


def clip_box(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of box clipped to a width x height image; None if empty."""
    x, y, w, h = (int(v) for v in box)
    left, top, right, bottom = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    return (left, top, right, bottom) if right > left and bottom > top else None


def face_crop(source: Path | bytes, box, mode: str) -> np.ndarray:
    """Decode an image, crop it to box (clipped), cap its side at CROP_MAX_SIDE: uint8 HxWxC."""
    image = decode_image(source, mode)  # base's decoder: pixel limit, 16-bit gray, any mode
    corners = clip_box(box, image.shape[1], image.shape[0])
    if corners is None:
        raise ValueError(f"face box {','.join(map(str, box))} lies outside the "
                         f"{image.shape[1]}x{image.shape[0]} image")
    left, top, right, bottom = corners
    crop = image[top:bottom, left:right]
    side = max(crop.shape[:2])
    if side <= CROP_MAX_SIDE:
        return np.ascontiguousarray(crop)
    scale = CROP_MAX_SIDE / side
    return resize_uint8(crop, max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale)))


class FaceCropSplit(FileSplit):
    """AffectNet's CSV layout: record i is the face box of its row, cropped from the file."""

    def __init__(self, name, class_names, labels, root: Path, paths: list[str], boxes, mode: str,
                 size: int | None = None, report=SplitReport()):
        super().__init__(name, class_names, labels, root, paths, mode, size, report)
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)

    def image(self, index: int) -> np.ndarray:
        path = self.root / self.paths[index]
        try:
            crop = face_crop(path, self.boxes[index], self.mode)
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{path}: face crop cannot be decoded ({e}); run `arm-jax "
                               "prepare` to check every image before training") from e
        return crop if self.size is None else resize_uint8(crop, self.size)


def _read_csv(data_dir, split, num_classes, problems):
    """(paths relative to data_dir, labels, wheres, dropped, boxes) from the official lists."""
    path = require(data_dir / LIST_DIR / CSV_FILE[split], "affectnet", HOW_TO_GET, LAYOUT)
    paths, labels, wheres, boxes, dropped = [], [], [], [], 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:  # bad bytes: that row
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        needed = ("subDirectory_filePath", "expression") + BOX_COLUMNS
        if any(name not in header for name in needed):
            raise DatasetError(f"{path}:1: header must have columns {', '.join(needed)} "
                               f"(found {', '.join(header)})")
        file_col, label_col = header.index(needed[0]), header.index(needed[1])
        box_cols = [header.index(name) for name in BOX_COLUMNS]
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
            box = _box(row, box_cols, where, problems)
            if box is None:
                continue
            paths.append(os.path.join(IMAGE_DIR, row[file_col].strip()))
            labels.append(label)
            wheres.append(where)
            boxes.append(box)
    return paths, labels, wheres, dropped, boxes


def _boxes_fit(data_dir, paths, boxes, wheres, keep, problems) -> None:
    """Mark (keep=False, a bad record) each kept row whose box misses its image entirely."""
    for i in np.flatnonzero(keep):
        resolved = contained_path(data_dir, paths[i])
        with Image.open(resolved) as im:  # the header only: the image was checked already
            size = im.size
        if clip_box(boxes[i], *size) is None:
            problems.add(*wheres[i], f"invalid face box {','.join(map(str, boxes[i]))}: it lies "
                                     f"outside the {size[0]}x{size[1]} image {resolved}")
            keep[i] = False


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
            # mmap: a header claiming 10^12 values must not allocate them.
            text = str(np.load(npy, mmap_mode="r", allow_pickle=False).reshape(-1)[0]).strip()
        except FileNotFoundError:
            problems.add(npy, None, f"annotation file is missing for {images / name}")
            continue
        except (ValueError, OSError, IndexError, EOFError) as e:  # EOFError: an empty file
            problems.add(npy, None, f"annotation file cannot be read ({type(e).__name__}: {e})")
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
    """AffectNet with 7 (codes 0-6) or 8 (codes 0-7) classes; val is the validation set = test.

    The CSV layout gives FaceRecords (a face box per record); the re-release plain Records.
    """
    if num_classes not in (7, 8):
        raise ValueError(f"num_classes must be 7 or 8, not {num_classes}")
    boxes = None
    if layout_of(data_dir) == "csv":
        paths, labels, wheres, dropped, boxes = _read_csv(data_dir, split, num_classes, problems)
    else:
        paths, labels, wheres, dropped = _read_npy(data_dir, split, num_classes, problems)
    keep = check_image_paths(data_dir, paths, wheres, problems, check_content=check_images)
    if boxes is not None and check_images:
        _boxes_fit(data_dir, paths, boxes, wheres, keep, problems)
    kwargs = dict(root=data_dir, paths=[p for p, k in zip(paths, keep) if k], mode="RGB",
                  dropped=dropped, dropped_reason=f"expression codes {num_classes}..10 are not in "
                                                  f"the {num_classes}-class protocol")
    labels = np.asarray(labels, np.int32)[keep]
    if boxes is None:
        return Records(CLASS_NAMES[:num_classes], labels, **kwargs)
    return FaceRecords(CLASS_NAMES[:num_classes], labels, **kwargs,
                       boxes=np.asarray(boxes, np.int64).reshape(-1, 4)[keep])
