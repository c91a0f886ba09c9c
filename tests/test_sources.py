"""Readers: labels and splits of each distributed format, and every kind of bad input."""

import os

import numpy as np
import pytest

from tests import fixtures as fx
from arm_jax.data.readers.fer2013 import ferplus_majority
from arm_jax.data.splits import open_split
from arm_jax.errors import DatasetError, UserError


def raw(dataset, data_dir, split, **kwargs):
    return open_split(dataset, data_dir, split, prepared=False, **kwargs)


# --- FER2013 and FER+ -----------------------------------------------------------------------

@pytest.mark.parametrize("icml", [False, True])
def test_fer2013_csv_splits_labels_pixels(tmp_path, rng, icml):
    rows = fx.fer2013_rows(rng)
    name = "icml_face_data.csv" if icml else "fer2013.csv"
    fx.write_fer2013_csv(tmp_path / name, rows, icml=icml)
    for split, usage in [("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")]:
        split_ = raw("fer2013", tmp_path, split)
        expected = [(label, pixels) for label, pixels, u in rows if u == usage]
        assert split_.labels.tolist() == [label for label, _ in expected]
        assert split_.class_names[6] == "neutral" and split_.class_names[0] == "anger"
        for i, (label, pixels) in enumerate(expected):
            item = split_[i]
            assert item["label"] == label and item["label"].dtype == np.int32
            np.testing.assert_array_equal(item["image"][..., 0], pixels)


@pytest.mark.parametrize("pixels, reason", [
    (" ".join(["7"] * 2303), "2303 pixel values, expected 2304"),
    (" ".join(["7"] * 2303 + ["x"]), "non-numeric pixel value 'x'"),
    (" ".join(["7"] * 2303 + ["300"]), "pixel value 300 outside 0..255"),
])
def test_fer2013_bad_pixels_name_file_and_line(tmp_path, rng, pixels, reason):
    rows = fx.fer2013_rows(rng)
    rows[2] = (rows[2][0], pixels, "Training")   # CSV line 4 (header is line 1)
    rows[5] = (rows[5][0], pixels, "Training")
    path = fx.write_fer2013_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(DatasetError) as error:
        raw("fer2013", tmp_path, "train")
    message = str(error.value)
    assert f"{path}:4: {reason}" in message and f"{path}:7:" in message
    assert "2 bad record(s)" in message
    split_ = raw("fer2013", tmp_path, "train", skip_bad=True)
    assert len(split_) == 5 and len(split_.report.skipped) == 2


def test_fer2013_unknown_label(tmp_path, rng):
    rows = fx.fer2013_rows(rng)
    rows[0] = (9, rows[0][1], "Training")
    path = fx.write_fer2013_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(DatasetError, match=f"{path}:2: unknown label '9'"):
        raw("fer2013", tmp_path, "train")


def test_fer2013_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        raw("fer2013", tmp_path / "nowhere", "train")
    assert "Kaggle" in str(error.value) and "fer2013.csv" in str(error.value)


def test_ferplus_majority_rule():
    # Single votes are outliers; the top class needs more than half of the rest.
    assert ferplus_majority(np.array([6, 1, 1, 1, 1, 0, 0, 0, 0, 0])) == 0
    assert ferplus_majority(np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1])) is None
    assert ferplus_majority(np.array([4, 4, 0, 0, 0, 0, 0, 0, 2, 0])) is None     # tie
    assert ferplus_majority(np.array([0, 0, 0, 0, 0, 0, 0, 6, 4, 0])) == 7        # contempt
    assert ferplus_majority(np.array([2, 0, 0, 0, 0, 0, 0, 0, 8, 0])) is None     # unknown


def test_ferplus_labels_follow_fer2013_rows(tmp_path, rng):
    rows = fx.fer2013_rows(rng, per_split=3)
    fx.write_fer2013_csv(tmp_path / "fer2013.csv", rows)
    votes = [[0] * 10 for _ in rows]
    for i in range(len(rows)):
        votes[i][i % 8] = 9
    votes[1] = [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]             # no majority: dropped
    names = [f"fer{i:07d}.png" for i in range(len(rows))]
    names[2] = ""                                           # no image: dropped
    fx.write_ferplus_csv(tmp_path / "fer2013new.csv",
                         [(u, n, v) for (_, _, u), n, v in zip(rows, names, votes, strict=True)])
    train = raw("ferplus", tmp_path, "train")
    assert train.labels.tolist() == [0] and train.report.dropped == 2
    assert train.class_names[0] == "neutral" and len(train.class_names) == 8
    np.testing.assert_array_equal(train[0]["image"][..., 0], rows[0][1])
    test = raw("ferplus", tmp_path, "test")
    assert test.labels.tolist() == [6, 7, 0]
    np.testing.assert_array_equal(test[2]["image"][..., 0], rows[8][1])
    (tmp_path / "fer2013new.csv").unlink()
    with pytest.raises(DatasetError, match="(?s)fer2013new.csv not found.*Microsoft"):
        raw("ferplus", tmp_path, "train")


# --- image folders --------------------------------------------------------------------------

def test_fer2013_folder_maps_by_name(tmp_path, rng):
    folders = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    images = {name: [fx.random_image(rng, (48, 48))] for name in folders}
    fx.write_class_folders(tmp_path, {"train": images, "test": images})
    train = raw("fer2013_folder", tmp_path, "train")
    # Folders sort alphabetically (neutral 5th) but labels follow the CSV: neutral is 6.
    assert train.labels.tolist() == [0, 1, 2, 3, 6, 4, 5]
    assert train[4]["image"].shape == (48, 48, 1)
    assert raw("fer2013_folder", tmp_path, "val").labels.tolist() == train.labels.tolist()


def test_generic_folder_and_unknown_class(tmp_path, rng):
    img = fx.random_image(rng, (32, 32, 3))
    fx.write_class_folders(tmp_path, {"train": {"b": [img, img], "a": [img]},
                                      "test": {"a": [img], "zz": [img]}}, suffix=".png")
    train = raw("folder", tmp_path, "train")
    assert train.class_names == ("a", "b") and train.labels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(train[0]["image"], img)   # PNG: lossless
    with pytest.raises(DatasetError, match="zz.*unknown label"):
        raw("folder", tmp_path, "test")
    assert raw("folder", tmp_path, "val", skip_bad=True).labels.tolist() == [0]


# --- RAF-DB ---------------------------------------------------------------------------------

def raf_entries(rng):
    train = [(f"train_{i:05d}.jpg", i % 7 + 1, fx.random_image(rng, (100, 100, 3)))
             for i in range(1, 8)]
    test = [(f"test_{i:04d}.jpg", 7 - i % 7, fx.random_image(rng, (100, 100, 3)))
            for i in range(1, 4)]
    return train + test


def test_raf_db_one_based_labels(tmp_path, rng):
    fx.write_raf_db(tmp_path, raf_entries(rng))
    train = raw("raf_db", tmp_path, "train")
    assert train.labels.tolist() == [1, 2, 3, 4, 5, 6, 0]   # file labels 2..7, 1
    assert train.class_names[0] == "surprise" and train.class_names[6] == "neutral"
    assert train[0]["image"].shape == (100, 100, 3)
    assert raw("raf_db", tmp_path, "val").labels.tolist() == [5, 4, 3]
    assert raw("raf_db", tmp_path, "test").labels.tolist() == [5, 4, 3]


def test_raf_db_bad_lines_and_images(tmp_path, rng):
    entries = raf_entries(rng)
    entries[1] = (entries[1][0], 9, entries[1][2])                    # line 2: label 9
    entries[2] = (entries[2][0], entries[2][1], None)                 # line 3: no image
    root = fx.write_raf_db(tmp_path, entries, extra_lines=("garbage",))   # line 11
    image_dir = root / "Image" / "aligned"
    (image_dir / "train_00004_aligned.jpg").write_bytes(b"not a jpeg")                # line 4
    good = (image_dir / "train_00005_aligned.jpg").read_bytes()
    (image_dir / "train_00005_aligned.jpg").write_bytes(good[: len(good) // 2])        # line 5
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    with pytest.raises(DatasetError) as error:
        raw("raf_db", root, "train")
    message = str(error.value)
    assert "5 bad record(s)" in message
    assert f"{label_file}:2: unknown label '9'" in message
    assert f"{label_file}:3: image file is missing" in message
    assert f"{label_file}:4: image file is corrupt" in message
    assert f"{label_file}:5: image file is corrupt" in message        # truncated
    assert f"{label_file}:11: cannot parse 'garbage'" in message
    assert raw("raf_db", root, "train", skip_bad=True).labels.tolist() == [1, 6, 0]


def test_symlink_escaping_the_dataset_is_refused(tmp_path, rng):
    root = fx.write_raf_db(tmp_path / "raf", raf_entries(rng))
    outside = fx.write_image(tmp_path / "outside.jpg", fx.random_image(rng, (100, 100, 3)))
    link = root / "Image" / "aligned" / "train_00001_aligned.jpg"
    link.unlink()
    os.symlink(outside, link)
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        raw("raf_db", root, "train")


# --- AffectNet ------------------------------------------------------------------------------

def affectnet_rows(rng, prefix, codes):
    return [(f"{100 + i}/{prefix}{i}.jpg", code, fx.random_image(rng, (60 + i, 50, 3)))
            for i, code in enumerate(codes)]


def test_affectnet_csv_7_and_8_classes(tmp_path, rng):
    fx.write_affectnet_csv(tmp_path, {"training": affectnet_rows(rng, "t", range(11)),
                                      "validation": affectnet_rows(rng, "v", [7, 0, 6])})
    seven, eight = raw("affectnet7", tmp_path, "train"), raw("affectnet8", tmp_path, "train")
    assert seven.labels.tolist() == list(range(7)) and seven.report.dropped == 4
    assert eight.labels.tolist() == list(range(8)) and eight.report.dropped == 3
    assert eight.class_names[7] == "contempt" and len(seven.class_names) == 7
    assert raw("affectnet7", tmp_path, "val").labels.tolist() == [0, 6]
    assert raw("affectnet8", tmp_path, "test").labels.tolist() == [7, 0, 6]
    _, _, width, height = fx.margin_box((63, 50))
    assert seven[3]["image"].shape == (height, width, 3)  # the face box, not the whole file
    assert raw("affectnet7", tmp_path, "train", image_size_hint=40)[3]["image"].shape == (40, 40, 3)


def test_affectnet_csv_path_escape_and_bad_code(tmp_path, rng):
    rows = affectnet_rows(rng, "t", [0, 1, 2])
    fx.write_image(tmp_path / "secret.jpg", rows[0][2])
    rows[1] = ("../../secret.jpg", 1, None)
    rows[2] = (rows[2][0], 12, rows[2][2])
    fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows[:1]})
    with pytest.raises(DatasetError) as error:
        raw("affectnet8", tmp_path / "an", "train")
    csv_path = tmp_path / "an" / "Manually_Annotated_file_lists" / "training.csv"
    assert f"{csv_path}:3: path '" in str(error.value) and "outside the dataset" in str(error.value)
    assert f"{csv_path}:4: unknown expression '12'" in str(error.value)


def test_affectnet_npy_re_release(tmp_path, rng):
    img = fx.random_image(rng, (40, 40, 3))
    root = fx.write_affectnet_npy(tmp_path, {
        "train_set": [(n, code, img) for n, code in [(0, 3), (1, 7), (2, 9), (10, 0)]],
        "val_set": [(5, 6, img)]})
    assert raw("affectnet8", root, "train").labels.tolist() == [3, 7, 0]
    assert raw("affectnet7", root, "train").labels.tolist() == [3, 0]
    assert raw("affectnet7", root, "test").labels.tolist() == [6]
    np.save(root / "train_set" / "annotations" / "1_exp.npy", np.array([object()], dtype=object))
    with pytest.raises(DatasetError, match="1_exp.npy: annotation file cannot be read"):
        raw("affectnet8", root, "train")


def test_affectnet_missing_explains_layout(tmp_path):
    with pytest.raises(DatasetError, match="(?s)authors on request.*train_set/images"):
        raw("affectnet7", tmp_path, "train")


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of fer2013"):
        raw("mnist", tmp_path, "train")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        raw("fer2013", tmp_path, "dev")
    with pytest.raises(UserError, match="--data-dir"):
        raw("raf_db", None, "train")


def test_only_variable_size_data_sets_are_decoded_to_the_model_size():
    """FER (48 px) and RAF-DB (100 px) travel at native size, so flip/noise happen there."""
    from arm_jax.data.sources import decode_size_hint

    assert decode_size_hint("raf_db", 224) is None and decode_size_hint("fer2013_folder", 224) is None
    assert decode_size_hint("affectnet7", 224) is None  # face crops, capped at CROP_MAX_SIDE
    assert decode_size_hint("folder", 112) == 112


# --- Subset (--max-train-examples / --max-eval-examples) --------------------------------------

def test_subset_draws_seeded_records_in_their_original_order():
    from arm_jax.data.base import Subset
    from arm_jax.data.synthetic import SyntheticSplit

    base = SyntheticSplit("train", size=40)
    subset = Subset(base, 12, seed=3)
    assert len(subset) == 12 and subset.class_names == base.class_names
    indices = subset.indices.tolist()
    assert indices == sorted(set(indices)) and indices != list(range(12))  # drawn, distinct, in order
    assert Subset(base, 12, seed=3).indices.tolist() == indices  # the seed decides
    assert Subset(base, 12, seed=4).indices.tolist() != indices
    for position, index in enumerate(indices):  # each record keeps its own image and label
        np.testing.assert_array_equal(subset[position]["image"], base[index]["image"])
        assert subset[position]["label"] == base[index]["label"]
    assert len(Subset(base, 100, seed=3)) == 40  # at most the whole split
