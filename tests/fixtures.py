"""Writers for tiny data sets in their real distributed formats, for any test to import."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

FER_HEADER = ("emotion", "pixels", "Usage")
FERPLUS_HEADER = ("Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger",
                  "disgust", "fear", "contempt", "unknown", "NF")
AFFECTNET_HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal")


def random_image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth random uint8 image (blurred noise, so JPEG sizes are realistic)."""
    small = rng.integers(0, 256, size=(max(shape[0] // 8, 1), max(shape[1] // 8, 1)) + shape[2:])
    big = np.asarray(Image.fromarray(small.astype(np.uint8).squeeze()).resize(
        (shape[1], shape[0]), Image.BILINEAR))
    return big.reshape(shape)


def write_image(path: Path, image: np.ndarray) -> Path:
    """Save a uint8 (H, W[, C]) image; the format follows the suffix (JPEG quality 90)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.squeeze()).save(path, quality=90)
    return path


def write_fer2013_csv(path: Path, rows, *, icml: bool = False) -> Path:
    """rows: (label, 48x48 uint8 pixels or a raw pixels string, usage). icml: leading spaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("emotion", " Usage", " pixels") if icml else FER_HEADER
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for label, pixels, usage in rows:
            text = pixels if isinstance(pixels, str) else " ".join(map(str, pixels.ravel()))
            fields = {"emotion": label, "pixels": text, "Usage": usage}
            writer.writerow([fields[name.strip()] for name in header])
    return path


def fer2013_rows(rng: np.random.Generator, per_split: int = 7):
    """Rows for every usage with labels cycling 0..6, and the pixels per row."""
    rows = []
    for usage in ("Training", "PublicTest", "PrivateTest"):
        for i in range(per_split):
            rows.append((i % 7, random_image(rng, (48, 48)), usage))
    return rows


def write_ferplus_csv(path: Path, rows) -> Path:
    """rows: (usage, image name ('' for none), ten vote counts)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FERPLUS_HEADER)
        for usage, name, votes in rows:
            writer.writerow([usage, name, *votes])
    return path


def write_class_folders(root: Path, splits: dict[str, dict[str, list[np.ndarray]]],
                        suffix: str = ".jpg") -> Path:
    """root/<split>/<class>/<i>.jpg for each image."""
    for split, classes in splits.items():
        for name, images in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                write_image(root / split / name / f"{i:05d}{suffix}", image)
    return root


def write_raf_db(root: Path, entries, *, extra_lines: tuple[str, ...] = ()) -> Path:
    """entries: (name like 'train_00001.jpg', label 1..7, 100x100x3 image or None)."""
    lines = [f"{name} {label}" for name, label, _ in entries] + list(extra_lines)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    (root / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
    for name, _, image in entries:
        if image is not None:
            write_image(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg", image)
    return root


def margin_box(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a face box inside AffectNet's margin (134,134,899,899 in 1167 px:
    11.5% of the side on each edge)."""
    height, width = shape[:2]
    x, y = round(0.115 * width), round(0.115 * height)
    return x, y, width - 2 * x, height - 2 * y


def write_raf_db_missing_images(root: Path, rng: np.random.Generator, missing: int = 7) -> Path:
    """RAF-DB with the first `missing` of its 10 training images absent; its 7 test images present."""
    entries = [(f"train_{i:05d}.jpg", 1 + i % 7, None if i <= missing else random_image(rng, (100, 100, 3)))
               for i in range(1, 11)]
    entries += [(f"test_{i:04d}.jpg", 1 + i % 7, random_image(rng, (100, 100, 3))) for i in range(1, 8)]
    return write_raf_db(root, entries)


def write_affectnet_csv(root: Path, splits: dict[str, list]) -> Path:
    """splits: {'training'|'validation': [(subDirectory_filePath, expression, image or None[,
    (face_x, face_y, face_width, face_height)])]}; the box defaults to margin_box(image).

    A path listed twice is written once (the last image given for it)."""
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    for which, rows in splits.items():
        with open(lists / f"{which}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(AFFECTNET_HEADER)
            for path, expression, image, *box in rows:
                box = box[0] if box else (margin_box(image.shape) if image is not None
                                          else (8, 8, 48, 48))
                writer.writerow([path, *box, "1.0;2.0", expression, 0.1, -0.2])
                if image is not None:
                    write_image(root / "Manually_Annotated_Images" / path, image)
    return root


def write_affectnet_npy(root: Path, splits: dict[str, list]) -> Path:
    """splits: {'train_set'|'val_set': [(number, expression, image)]}; codes saved as strings."""
    for which, rows in splits.items():
        (root / which / "annotations").mkdir(parents=True, exist_ok=True)
        for number, expression, image in rows:
            write_image(root / which / "images" / f"{number}.jpg", image)
            np.save(root / which / "annotations" / f"{number}_exp.npy", np.array(str(expression)))
            np.save(root / which / "annotations" / f"{number}_val.npy", np.array("0.25"))
    return root


# How far a prepared AffectNet crop (JPEG at tfds_builders.CROP_SIDE) may be from the raw reader's
# crop resized to that side: mean absolute difference in grey levels. Measured <= 1.0 on the crops
# of these writers' images of up to 90 px (libjpeg-turbo's integer DCT: the same on every CPU); the
# crop of a box one pixel off is >= 4.1 from it, the whole file or a mirrored crop >= 34.
PREPARED_CROP_MEAN_ERROR = 2.0


def crop_error(prepared: np.ndarray, raw_crop: np.ndarray) -> float:
    """Mean absolute difference of a prepared AffectNet crop from a raw crop resized to its size."""
    side = prepared.shape[0]
    resized = np.asarray(Image.fromarray(raw_crop).resize((side, side), Image.BILINEAR))
    return float(np.abs(prepared.astype(np.int16) - resized).mean())
