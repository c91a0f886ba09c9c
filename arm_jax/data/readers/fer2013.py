"""FER2013 as distributed: `fer2013.csv` (or `icml_face_data.csv`) and the FER+ relabelling."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np

from arm_jax.data.base import Problems, Records
from arm_jax.data.readers import require
from arm_jax.errors import DatasetError

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FERPLUS_CLASS_NAMES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                       "fear", "contempt")
USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
SIDE = 48
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")
HOW_TO_GET = ("Get fer2013.csv from the Kaggle competition \"Challenges in Representation "
              "Learning: Facial Expression Recognition Challenge\" (icml_face_data.csv from the "
              "same competition works too).")
LAYOUT = "  DATA_DIR/fer2013.csv   (columns emotion,pixels,Usage; 35,887 rows)"
FERPLUS_HOW_TO_GET = ("FER+ needs fer2013new.csv from Microsoft's FERPlus repository on GitHub "
                      "next to fer2013.csv (" + HOW_TO_GET + ")")
FERPLUS_LAYOUT = LAYOUT + "\n  DATA_DIR/fer2013new.csv   (FER+ votes, same row order)"
_PIXELS = re.compile(r"[0-9 ]*")


def find_csv(data_dir: Path) -> Path:
    """fer2013.csv or icml_face_data.csv in data_dir, else a DatasetError saying where to get it."""
    for name in CSV_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    return require(data_dir / CSV_NAMES[0], "fer2013", HOW_TO_GET, LAYOUT)


def read_table(path: Path, needed: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """A CSV's column index (names stripped: icml_face_data.csv has ' pixels') and its rows."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}:1: file is empty, expected a header {','.join(needed)}")
        columns = {name.strip(): i for i, name in enumerate(header)}
        missing = [name for name in needed if name not in columns]
        if missing:
            raise DatasetError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                               f"(found {', '.join(columns)})")
        # line_num counts physical lines, so a quoted field with a newline keeps numbers right.
        return columns, [(reader.line_num, row) for row in reader]


def parse_pixels(text: str) -> tuple[np.ndarray | None, str | None]:
    """One row's 48x48 pixels from space-separated values, or (None, why not)."""
    if not _PIXELS.fullmatch(text):
        bad = next(t for t in text.split() if not t.isdigit())
        return None, f"non-numeric pixel value {bad[:20]!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = np.fromstring(text, dtype=np.int32, sep=" ")
    if values.size != SIDE * SIDE:
        return None, f"{values.size} pixel values, expected {SIDE * SIDE} (48x48)"
    if values.max(initial=0) > 255:
        return None, f"pixel value {values.max()} outside 0..255"
    return values.astype(np.uint8).reshape(SIDE, SIDE, 1), None


def _split_rows(path, rows, columns, split, problems):
    """The rows of one split (by the Usage column); rows of unknown usage are bad records."""
    usage_col, wanted = columns["Usage"], USAGE[split]
    selected = []
    for index, (line, row) in enumerate(rows):
        if len(row) != len(columns):
            problems.add(path, line, f"{len(row)} fields, expected {len(columns)}")
        elif row[usage_col].strip() not in USAGE.values():
            problems.add(path, line, f"unknown Usage {row[usage_col]!r} "
                                     f"(expected {', '.join(USAGE.values())})")
        elif row[usage_col].strip() == wanted:
            selected.append(index)
    return selected


def _pixels_and_labels(path, rows, columns, indices, problems, label_of):
    """Pixels of the rows at `indices` whose label_of(row) is an int; bad rows are recorded."""
    images, labels = [], []
    for index in indices:
        line, row = rows[index]
        label, why = label_of(index)
        if label is None:
            if why:
                problems.add(*why)
            continue
        pixels, why_not = parse_pixels(row[columns["pixels"]].strip())
        if pixels is None:
            problems.add(path, line, why_not)
            continue
        images.append(pixels)
        labels.append(label)
    images = np.stack(images) if images else np.zeros((0, SIDE, SIDE, 1), np.uint8)
    return images, np.asarray(labels, dtype=np.int32)


def read_fer2013(data_dir: Path, split: str, problems: Problems) -> Records:
    """FER2013 from its CSV: train = Training, val = PublicTest, test = PrivateTest."""
    path = find_csv(data_dir)
    columns, rows = read_table(path, ("emotion", "pixels", "Usage"))
    indices = _split_rows(path, rows, columns, split, problems)

    def label_of(index):
        line, row = rows[index]
        text = row[columns["emotion"]].strip()
        if text.isdigit() and int(text) < len(CLASS_NAMES):
            return int(text), None
        return None, (path, line, f"unknown label {text!r} (expected 0..{len(CLASS_NAMES) - 1})")

    images, labels = _pixels_and_labels(path, rows, columns, indices, problems, label_of)
    return Records(CLASS_NAMES, labels, images=images, mode="L")


def ferplus_majority(votes: np.ndarray) -> int | None:
    """The FERPlus reference code's "majority" label from 10 vote counts, or None (dropped).

    As in Microsoft's FERPlus code: single votes are removed as outliers, the top class
    needs more than half of the remaining votes (so no ties), and images whose majority
    is "unknown" or "NF" (not a face) are left out.
    """
    votes = np.where(votes <= 1, 0, votes)
    top = int(np.argmax(votes))
    if votes[top] == 0 or votes[top] <= 0.5 * votes.sum() or top >= len(FERPLUS_CLASS_NAMES):
        return None
    return top


def read_ferplus(data_dir: Path, split: str, problems: Problems) -> Records:
    """FER+ labels (fer2013new.csv, majority vote) on FER2013's pixels, row by row."""
    new_path = require(data_dir / "fer2013new.csv", "ferplus", FERPLUS_HOW_TO_GET, FERPLUS_LAYOUT)
    old_path = find_csv(data_dir)
    columns, rows = read_table(old_path, ("pixels", "Usage"))
    vote_names = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                  "contempt", "unknown", "NF")
    new_columns, new_rows = read_table(new_path, ("Usage", "Image name") + vote_names)
    if len(new_rows) != len(rows):
        raise DatasetError(f"{new_path}: {len(new_rows)} rows but {old_path} has {len(rows)}; "
                           "fer2013new.csv must be row-aligned with the original fer2013.csv")
    indices = _split_rows(old_path, rows, columns, split, problems)
    dropped = 0

    def label_of(index):
        nonlocal dropped
        line, row = new_rows[index]
        if len(row) != len(new_columns):
            return None, (new_path, line, f"{len(row)} fields, expected {len(new_columns)}")
        if row[new_columns["Usage"]].strip() != USAGE[split]:
            return None, (new_path, line, f"Usage {row[new_columns['Usage']]!r} differs from "
                                          f"{old_path}:{rows[index][0]}")
        if not row[new_columns["Image name"]].strip():
            dropped += 1  # FER+ leaves these out (not a usable face)
            return None, None
        texts = [row[new_columns[name]].strip() for name in vote_names]
        if not all(t.isdigit() for t in texts):
            return None, (new_path, line, f"non-integer vote count in {texts}")
        label = ferplus_majority(np.asarray(texts, dtype=np.int64))
        if label is None:
            dropped += 1
        return label, None

    images, labels = _pixels_and_labels(old_path, rows, columns, indices, problems, label_of)
    return Records(FERPLUS_CLASS_NAMES, labels, images=images, mode="L", dropped=dropped,
                   dropped_reason="no image name, no FER+ majority, or majority unknown/NF")
