"""RAF-DB (basic emotions) as distributed: a label list and aligned 100x100 faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arm_jax.data.base import Problems, Records, check_image_paths
from arm_jax.data.classes import dataset_classes
from arm_jax.data.readers import require

# Label file ids 1..7 in this order; label id = file id - 1.
CLASS_NAMES = dataset_classes("raf_db")
LABEL_FILE = Path("EmoLabel/list_patition_label.txt")  # sic: the release spells it so
IMAGE_DIR = Path("Image/aligned")
HOW_TO_GET = ("RAF-DB is distributed by its authors on request (Real-world Affective Faces "
              "Database, basic emotion subset).")
LAYOUT = ("  DATA_DIR/EmoLabel/list_patition_label.txt   (lines 'train_00001.jpg 5')\n"
          "  DATA_DIR/Image/aligned/train_00001_aligned.jpg ...")
# The released ARM code validates on the test set; RAF-DB has no validation split.
FILE_PREFIX = {"train": "train_", "val": "test_", "test": "test_"}


def read_raf_db(data_dir: Path, split: str, problems: Problems, *,
                check_images: bool = True) -> Records:
    """RAF-DB basic: labels 1..7 become ids 0..6; val is the test set."""
    label_path = require(data_dir / LABEL_FILE, "raf_db", HOW_TO_GET, LAYOUT)
    require(data_dir / IMAGE_DIR, "raf_db", HOW_TO_GET, LAYOUT)
    paths, labels, wheres = [], [], []
    # Undecodable bytes become U+FFFD: that line is reported, not the whole file a traceback.
    with open(label_path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].lower().endswith(".jpg"):
                problems.add(label_path, line_number,
                             f"cannot parse {line.strip()[:60]!r} (expected 'train_00001.jpg 5')")
                continue
            name, label = fields
            if not name.startswith(("train_", "test_")):
                problems.add(label_path, line_number, f"image name {name!r} is neither train_ "
                                                      "nor test_")
                continue
            if not name.startswith(FILE_PREFIX[split]):
                continue
            if not (label.isascii() and label.isdigit() and 1 <= int(label) <= len(CLASS_NAMES)):
                problems.add(label_path, line_number, f"unknown label {label!r} (expected 1..7)")
                continue
            paths.append(str(IMAGE_DIR / f"{Path(name).stem}_aligned.jpg"))
            labels.append(int(label) - 1)
            wheres.append((label_path, line_number))
    keep = check_image_paths(data_dir, paths, wheres, problems, check_content=check_images)
    return Records(CLASS_NAMES, np.asarray(labels, np.int32)[keep], root=data_dir,
                   paths=[p for p, k in zip(paths, keep) if k], mode="RGB")
