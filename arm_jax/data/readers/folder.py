"""Labelled image folders: `DIR/<split>/<class>/*.jpg`, generic and FER2013's folder release."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from arm_jax.data.base import IMAGE_SUFFIXES, Problems, Records, check_image_paths
from arm_jax.data.classes import canonical_name, canonical_names
from arm_jax.data.readers import require
from arm_jax.data.readers.fer2013 import CLASS_NAMES as FER_CLASS_NAMES
from arm_jax.errors import DatasetError

FOLDER_LAYOUT = ("  DATA_DIR/train/<class_name>/*.jpg|jpeg|png\n"
                 "  DATA_DIR/val/<class_name>/...   (optional: val uses test/ when absent)\n"
                 "  DATA_DIR/test/<class_name>/...\n"
                 "Classes are the sorted folder names of train/ (known spellings of an\n"
                 "expression, e.g. 'Happy', are named canonically: 'happiness').")
FER_FOLDER_HOW_TO_GET = ("The FER2013 folder release (train/ and test/ with one folder per "
                         "emotion) is a re-upload of Kaggle's \"Challenges in Representation "
                         "Learning: Facial Expression Recognition Challenge\" data. It has no "
                         "validation split: val is the test folder.")
FER_FOLDER_LAYOUT = ("  DATA_DIR/train/{angry,disgust,fear,happy,neutral,sad,surprise}/*.jpg\n"
                     "  DATA_DIR/test/{same seven folders}/*.jpg")


def list_class_folder(split_dir: Path, class_names: tuple[str, ...] | None,
                      problems: Problems) -> tuple[list[str], list[str]]:
    """(relative image paths, their canonical class names) under split_dir/<class>/, sorted."""
    paths, classes = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_names is not None and canonical_name(class_dir.name) not in class_names:
            problems.add(class_dir, None, f"unknown label: class folder {class_dir.name!r} is not "
                                          f"one of {', '.join(class_names)}")
            continue
        for name in sorted(os.listdir(class_dir)):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                paths.append(f"{split_dir.name}/{class_dir.name}/{name}")
                classes.append(canonical_name(class_dir.name))
    return paths, classes


def _records(data_dir, paths, labels, class_names, problems, mode, check_images):
    """Records of the folder images that stay inside data_dir and are sound images."""
    wheres = [(data_dir / p, None) for p in paths]
    keep = check_image_paths(data_dir, paths, wheres, problems, check_content=check_images)
    return Records(tuple(class_names), np.asarray(labels, np.int32)[keep], root=data_dir,
                   paths=[p for p, k in zip(paths, keep) if k], mode=mode)


def read_folder(data_dir: Path, split: str, problems: Problems, *,
                check_images: bool = True) -> Records:
    """A generic labelled folder; classes: the sorted folder names of train/, named canonically."""
    train_dir = require(data_dir / "train", "folder", "A labelled image folder.", FOLDER_LAYOUT)
    class_names = canonical_names(sorted(p.name for p in train_dir.iterdir() if p.is_dir()),
                                  f"class folders of {train_dir}")
    if not class_names:
        raise DatasetError(f"{train_dir}: no class folders found.\nExpected layout:\n"
                           f"{FOLDER_LAYOUT}")
    split_name = "test" if split == "val" and not (data_dir / "val").is_dir() else split
    split_dir = require(data_dir / split_name, "folder", "A labelled image folder.", FOLDER_LAYOUT)
    paths, classes = list_class_folder(split_dir, class_names, problems)
    labels = [class_names.index(c) for c in classes]
    return _records(data_dir, paths, labels, class_names, problems, "RGB", check_images)


def read_fer2013_folder(data_dir: Path, split: str, problems: Problems, *,
                        check_images: bool = True) -> Records:
    """FER2013's folder release; folders map by name to the CSV's label ids (neutral -> 6).

    There is no validation folder: val is test (PublicTest + PrivateTest together).
    """
    split_dir = require(data_dir / ("train" if split == "train" else "test"), "fer2013_folder",
                        FER_FOLDER_HOW_TO_GET, FER_FOLDER_LAYOUT)
    paths, classes = list_class_folder(split_dir, FER_CLASS_NAMES, problems)
    labels = [FER_CLASS_NAMES.index(c) for c in classes]
    return _records(data_dir, paths, labels, FER_CLASS_NAMES, problems, "L", check_images)
