"""FER2013 as distributed: `fer2013.csv` (or `icml_face_data.csv`) and the FER+ relabelling."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from arm_jax.data.base import Problems, Records
from arm_jax.data.classes import dataset_classes
from arm_jax.data.readers import require
from arm_jax.errors import DatasetError

CLASS_NAMES = dataset_classes("fer2013")  # anger, disgust, fear, happiness, sadness, ...
FERPLUS_CLASS_NAMES = dataset_classes("ferplus")
USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
SIDE = 48
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")
HOW_TO_GET = ("Get fer2013.csv from the Kaggle competition \"Challenges in Representation "
              "Learning: Facial Expression Recognition Challenge\" (icml_face_data.csv from the "
              "same competition works too).")
_CHUNK = 1024  # rows per parse_pixels call
LAYOUT = "  DATA_DIR/fer2013.csv   (columns emotion,pixels,Usage; 35,887 rows)"
FERPLUS_HOW_TO_GET = ("FER+ needs fer2013new.csv from Microsoft's FERPlus repository on GitHub "
                      "next to fer2013.csv (" + HOW_TO_GET + ")")
FERPLUS_LAYOUT = LAYOUT + "\n  DATA_DIR/fer2013new.csv   (FER+ votes, same row order)"


def find_csv(data_dir: Path) -> Path:
    """fer2013.csv or icml_face_data.csv in data_dir, else a DatasetError saying where to get it."""
    for name in CSV_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    return require(data_dir / CSV_NAMES[0], "fer2013", HOW_TO_GET, LAYOUT)


def _fields(line: str) -> list[str]:
    """A CSV line's fields; plain split unless the line has quotes (FER2013's lines do not)."""
    return line.split(",") if '"' not in line else next(csv.reader([line]))


Rows = list[tuple[int, list[str]]]  # (line number, fields)


def read_table(path: Path, needed: tuple[str, ...]) -> tuple[dict[str, int], Rows]:
    """A CSV's column index (names stripped: icml_face_data.csv has ' pixels') and its rows.

    Rows are (line number, fields); a field may not span lines (none does in these files).
    str.split instead of the csv module: 4x faster on the 300 MB fer2013.csv.
    """
    # latin-1 maps bytes 1:1, so decoding is a copy and no file makes it fail.
    lines = path.read_bytes().decode("latin-1").splitlines()
    if not lines:
        raise DatasetError(f"{path}:1: file is empty, expected a header {','.join(needed)}")
    columns = {name.strip(): i for i, name in enumerate(_fields(lines[0]))}
    missing = [name for name in needed if name not in columns]
    if missing:
        raise DatasetError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                           f"(found {', '.join(columns)})")
    return columns, [(n, _fields(line)) for n, line in enumerate(lines[1:], start=2) if line]


def parse_pixels(texts: list[str]) -> tuple[np.ndarray, list[str | None]]:
    """Rows of space-separated pixel values -> (uint8 (N, 48, 48, 1), why each row is bad or None).

    Checked vectorised over all rows (characters and value counts per row), then parsed
    by one np.fromstring over the good rows: per-row parsing takes seconds for 35,887 rows.
    Bad rows come back as zeros.
    """
    if not texts:
        return np.zeros((0, SIDE, SIDE, 1), np.uint8), []
    row_starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    chars = np.frombuffer(" ".join(texts).encode("latin-1", "replace"), np.uint8)
    digit = (chars - ord("0")) < 10                   # uint8 arithmetic wraps below "0"
    others = np.add.reduceat(~digit & (chars != ord(" ")), row_starts)
    starts = digit & ~np.concatenate([[False], digit[:-1]])
    counts = np.add.reduceat(starts, row_starts)
    reasons: list[str | None] = []
    for text, other, count in zip(texts, others, counts):
        if other:
            bad = next(t for t in text.split() if not (t.isascii() and t.isdigit()))  # '¹'
            reasons.append(f"non-numeric pixel value {bad[:20]!r}")
        elif count != SIDE * SIDE:
            reasons.append(f"{count} pixel values, expected {SIDE * SIDE} (48x48)")
        else:
            reasons.append(None)
    good = [i for i, r in enumerate(reasons) if r is None]
    values = np.zeros((len(texts), SIDE * SIDE), np.int64)
    if good:
        values[good] = np.fromstring(" ".join(texts[i] for i in good), dtype=np.int64,
                                     sep=" ").reshape(len(good), SIDE * SIDE)
    for i in np.flatnonzero(values.max(axis=1) > 255):
        reasons[i] = f"pixel value {int(values[i].max())} outside 0..255"
        values[i] = 0
    return values.astype(np.uint8).reshape(-1, SIDE, SIDE, 1), reasons


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
    labelled = []
    for index in indices:
        label, why = label_of(index)
        if label is not None:
            labelled.append((index, label))
        elif why:
            problems.add(*why)
    texts = [rows[i][1][columns["pixels"]].strip() for i, _ in labelled]
    # In chunks, to bound parse_pixels' scratch memory (a few bytes per character).
    chunks = [parse_pixels(texts[i:i + _CHUNK]) for i in range(0, len(texts), _CHUNK)]
    chunks = chunks or [parse_pixels([])]
    images = np.concatenate([c[0] for c in chunks])
    reasons = [r for c in chunks for r in c[1]]
    for (index, _), reason in zip(labelled, reasons):
        if reason is not None:
            problems.add(path, rows[index][0], reason)
    good = np.array([r is None for r in reasons], dtype=bool)
    labels = np.asarray([label for _, label in labelled], dtype=np.int32)
    return images[good], labels[good] if len(labels) else labels


def read_fer2013(data_dir: Path, split: str, problems: Problems) -> Records:
    """FER2013 from its CSV: train = Training, val = PublicTest, test = PrivateTest."""
    path = find_csv(data_dir)
    columns, rows = read_table(path, ("emotion", "pixels", "Usage"))
    indices = _split_rows(path, rows, columns, split, problems)

    def label_of(index):
        line, row = rows[index]
        text = row[columns["emotion"]].strip()
        if text.isascii() and text.isdigit() and int(text) < len(CLASS_NAMES):  # not '²'
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
        if not all(t.isascii() and t.isdigit() for t in texts):  # '²'.isdigit() too
            return None, (new_path, line, f"non-integer vote count in {texts}")
        label = ferplus_majority(np.asarray(texts, dtype=np.int64))
        if label is None:
            dropped += 1
        return label, None

    images, labels = _pixels_and_labels(old_path, rows, columns, indices, problems, label_of)
    return Records(FERPLUS_CLASS_NAMES, labels, images=images, mode="L", dropped=dropped,
                   dropped_reason="no image name, no FER+ majority, or majority unknown/NF")
