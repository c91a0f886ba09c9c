"""prepare: ArrayRecord copies identical to the raw reader (AffectNet's crops: within JPEG's error),
rebuilt when a source changes; data prepared in the previous format still reads."""

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from arm_jax.data import tfds_builders
from arm_jax.data.base import SPLITS
from arm_jax.data.prepared import PreparedSplit, prepare
from arm_jax.data.tfds_builders import CROP_SIDE
from arm_jax.data.splits import open_split
from arm_jax.errors import DatasetError
from cli.data import prepare as prepare_command
from tests import fixtures as fx


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def _equal_images(prepared: np.ndarray, raw: np.ndarray) -> None:
    assert prepared.dtype == raw.dtype
    np.testing.assert_array_equal(prepared, raw)


def assert_same(prepared, raw, same_image=_equal_images):
    """The prepared split has the raw reader's name, classes and labels, and each image passes
    `same_image(prepared, raw)` (default: equal, dtype included)."""
    assert isinstance(prepared, PreparedSplit) and not isinstance(raw, PreparedSplit)
    assert prepared.class_names == raw.class_names and prepared.name == raw.name
    np.testing.assert_array_equal(prepared.labels, raw.labels)
    for i in range(len(raw)):
        a, b = prepared[i], raw[i]
        assert a["label"] == b["label"]
        same_image(a["image"], b["image"])


def corrupt_middle(path: Path) -> None:
    """Garbage inside the entropy-coded data: header and end marker intact, decode fails."""
    data = path.read_bytes()
    half = len(data) // 2
    path.write_bytes(data[:half] + b"\xff\xc0" * 5 + data[half:])


def test_fer2013_prepared_equals_raw(tmp_path, rng):
    fx.write_fer2013_csv(tmp_path / "src" / "fer2013.csv", fx.fer2013_rows(rng, per_split=5))
    result = prepare("fer2013", tmp_path / "src", tfds_data_dir=tmp_path / "tfds")
    assert result.sizes == {"train": 5, "val": 5, "test": 5} and not result.reused
    for split in SPLITS:
        raw = open_split("fer2013", tmp_path / "src", split, prepared=False)
        assert_same(open_split("fer2013", tmp_path / "src", split, tfds_data_dir=tmp_path / "tfds"),
                    raw)
    assert prepare("fer2013", tmp_path / "src", tfds_data_dir=tmp_path / "tfds").reused


def test_raf_db_prepared_equals_raw_and_is_rebuilt_when_a_source_changes(tmp_path, rng):
    entries = [(f"train_{i:05d}.jpg", i % 7 + 1, fx.random_image(rng, (100, 100, 3)))
               for i in range(1, 9)] + [("test_0001.jpg", 3, fx.random_image(rng, (100, 100, 3)))]
    src, tfds_dir = fx.write_raf_db(tmp_path / "raf", entries), tmp_path / "tfds"
    first = prepare("raf_db", src, tfds_data_dir=tfds_dir)
    for split in SPLITS:
        assert_same(open_split("raf_db", src, split, tfds_data_dir=tfds_dir),
                    open_split("raf_db", src, split, prepared=False))
    # A corrected label: the old prepared copy must not be served.
    label_file = src / "EmoLabel" / "list_patition_label.txt"
    label_file.write_text(label_file.read_text().replace("train_00001.jpg 2", "train_00001.jpg 7"))
    stale = open_split("raf_db", src, "train", tfds_data_dir=tfds_dir)
    assert not isinstance(stale, PreparedSplit) and stale.labels[0] == 6
    second = prepare("raf_db", src, tfds_data_dir=tfds_dir)
    assert second.path != first.path and not second.reused
    assert_same(open_split("raf_db", src, "train", tfds_data_dir=tfds_dir),
                open_split("raf_db", src, "train", prepared=False))
    # A replaced image (same name): rebuilt too.
    image = src / "Image" / "aligned" / "train_00002_aligned.jpg"
    fx.write_image(image, fx.random_image(rng, (100, 100, 3)))
    os.utime(image, ns=(1, 1))
    assert not isinstance(open_split("raf_db", src, "train", tfds_data_dir=tfds_dir), PreparedSplit)
    assert prepare("raf_db", src, tfds_data_dir=tfds_dir).path not in (first.path, second.path)


def test_prepare_decodes_every_image_and_honours_skip_bad(tmp_path, rng, monkeypatch):
    img = fx.random_image(rng, (50, 50, 3))
    src = fx.write_class_folders(tmp_path / "src", {"train": {"a": [img] * 3, "b": [img] * 2},
                                                   "test": {"a": [img], "b": [img]}})
    bad = src / "train" / "a" / "00001.jpg"
    corrupt_middle(bad)
    # The cheap open-time check passes this file; the decode on access stops with its name.
    raw = open_split("folder", src, "train", prepared=False)
    with pytest.raises(DatasetError, match=f"{bad}: image cannot be decoded"):
        raw[1]
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DatasetError, match=f"(?s)1 bad record.*{bad}: image file cannot be decode"):
        prepare("folder", src)
    assert not (tmp_path / "tfds" / "arm_folder").exists() or not any(
        (tmp_path / "tfds" / "arm_folder").rglob("dataset_info.json"))
    result = prepare("folder", src, skip_bad=True)
    assert result.skipped == {"train": 1, "val": 0, "test": 0} and result.sizes["train"] == 4
    assert str(result.path).startswith(str(tmp_path / "tfds"))
    with pytest.raises(DatasetError, match=f"{bad}.*\n.*prepared with --skip-bad"):
        open_split("folder", src, "train")
    split = open_split("folder", src, "train", skip_bad=True)
    assert isinstance(split, PreparedSplit) and split.labels.tolist() == [0, 0, 1, 1]
    assert len(split.report.skipped) == 1 and split[1]["image"].shape == (50, 50, 3)


def test_affectnet_npy_prepared_equals_raw(tmp_path, rng):
    rows = [(n, code, fx.random_image(rng, (30 + n, 40, 3))) for n, code in enumerate([0, 7, 9, 3])]
    src = fx.write_affectnet_npy(tmp_path / "an", {"train_set": rows, "val_set": rows[:2]})
    result = prepare("affectnet7", src, tfds_data_dir=tmp_path / "tfds")
    assert result.dropped["train"] == 2 and result.sizes["train"] == 2
    for split in ("train", "test"):
        assert_same(open_split("affectnet7", src, split, tfds_data_dir=tmp_path / "tfds"),
                    open_split("affectnet7", src, split, prepared=False))
    eight = prepare("affectnet8", src, tfds_data_dir=tmp_path / "tfds")
    assert eight.sizes["train"] == 3 and eight.path != result.path


def test_cli_prepare(tmp_path, rng):
    fx.write_fer2013_csv(tmp_path / "fer2013.csv", fx.fer2013_rows(rng, per_split=2))
    runner = CliRunner()
    out = runner.invoke(prepare_command, ["--dataset", "fer2013", "--data-dir", str(tmp_path),
                                          "--tfds-data-dir", str(tmp_path / "tfds")])
    assert out.exit_code == 0, out.output
    assert "train: 2 records" in out.output
    out = runner.invoke(prepare_command, ["--dataset", "mnist", "--data-dir", str(tmp_path)])
    assert out.exit_code == 2 and "--dataset" in out.output and "raf_db" in out.output


def _assert_every_split_round_trips(dataset, src, tfds_dir):
    for split in SPLITS:
        assert_same(open_split(dataset, src, split, tfds_data_dir=tfds_dir),
                    open_split(dataset, src, split, prepared=False))


def test_ferplus_prepared_equals_raw_and_a_changed_vote_file_is_read_raw(tmp_path, rng):
    rows = fx.fer2013_rows(rng, per_split=4)
    src, tfds_dir = tmp_path / "src", tmp_path / "tfds"
    fx.write_fer2013_csv(src / "fer2013.csv", rows)
    votes = [[0] * 10 for _ in rows]
    for i in range(len(rows)):
        votes[i][i % 8] = 9  # majority class i % 8 (contempt included)
    votes[1] = [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]  # no majority: dropped in both readers
    names = [f"fer{i:07d}.png" for i in range(len(rows))]
    fx.write_ferplus_csv(src / "fer2013new.csv", [(u, n, v) for (_, _, u), n, v in zip(rows, names, votes, strict=True)])
    first = prepare("ferplus", src, tfds_data_dir=tfds_dir)
    assert first.sizes == {"train": 3, "val": 4, "test": 4} and not first.reused
    _assert_every_split_round_trips("ferplus", src, tfds_dir)
    # New votes (the labels come from fer2013new.csv): the old records must not be served.
    votes[0] = [0, 0, 0, 0, 0, 0, 0, 9, 0, 0]
    fx.write_ferplus_csv(src / "fer2013new.csv", [(u, n, v) for (_, _, u), n, v in zip(rows, names, votes, strict=True)])
    stale = open_split("ferplus", src, "train", tfds_data_dir=tfds_dir)
    assert not isinstance(stale, PreparedSplit) and stale.labels[0] == 7
    second = prepare("ferplus", src, tfds_data_dir=tfds_dir)
    assert second.path != first.path and not second.reused
    _assert_every_split_round_trips("ferplus", src, tfds_dir)


@pytest.mark.parametrize("dataset", ["folder", "fer2013_folder"])
def test_image_folders_prepared_equal_raw_and_an_added_image_is_read_raw(tmp_path, rng, dataset):
    names = ["angry", "happy", "sad"] if dataset == "folder" else \
        ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    shape = (40, 30, 3) if dataset == "folder" else (48, 48)
    images = lambda n: {name: [fx.random_image(rng, shape) for _ in range(n)] for name in names}
    src = fx.write_class_folders(tmp_path / "src", {"train": images(2), "test": images(1)})
    tfds_dir = tmp_path / "tfds"
    first = prepare(dataset, src, tfds_data_dir=tfds_dir)
    assert first.sizes["train"] == 2 * len(names) and not first.reused
    _assert_every_split_round_trips(dataset, src, tfds_dir)
    assert prepare(dataset, src, tfds_data_dir=tfds_dir).reused
    fx.write_image(src / "train" / "happy" / "00009.jpg", fx.random_image(rng, shape))
    stale = open_split(dataset, src, "train", tfds_data_dir=tfds_dir)
    assert not isinstance(stale, PreparedSplit) and len(stale) == 2 * len(names) + 1
    second = prepare(dataset, src, tfds_data_dir=tfds_dir)
    assert second.path != first.path and second.sizes["train"] == 2 * len(names) + 1
    _assert_every_split_round_trips(dataset, src, tfds_dir)


def _crop_within_jpeg_error(prepared: np.ndarray, raw: np.ndarray) -> None:
    assert prepared.shape == (CROP_SIDE, CROP_SIDE, 3)
    assert fx.crop_error(prepared, raw) <= fx.PREPARED_CROP_MEAN_ERROR


def assert_same_crops(prepared, raw):
    """AffectNet's CSV crops: the raw reader's labels, and its crops within JPEG's error."""
    assert_same(prepared, raw, same_image=_crop_within_jpeg_error)


def test_affectnet_csv_prepared_is_the_raw_crop_and_a_changed_list_is_read_raw(tmp_path, rng):
    """The CSV release: prepared face crops are the raw reader's, resized and JPEG-encoded."""
    shared = fx.random_image(rng, (90, 80, 3))
    rows = [("1/a.jpg", 0, fx.random_image(rng, (70, 70, 3))), ("1/b.jpg", 1, shared),
            ("1/b.jpg", 2, shared, (4, 6, 30, 40)),  # same file, another face
            ("2/c.jpg", 9, fx.random_image(rng, (60, 50, 3)))]  # not an expression: dropped
    src, tfds_dir = fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows[:2]}), tmp_path / "tfds"
    first = prepare("affectnet8", src, tfds_data_dir=tfds_dir)
    assert first.sizes["train"] == 3 and not first.reused
    for split in ("train", "test"):
        assert_same_crops(open_split("affectnet8", src, split, tfds_data_dir=tfds_dir),
                          open_split("affectnet8", src, split, prepared=False))
    fx.write_affectnet_csv(src, {"training": rows[:2] + [("1/b.jpg", 5, shared, (4, 6, 30, 40))]})
    stale = open_split("affectnet8", src, "train", tfds_data_dir=tfds_dir)
    assert not isinstance(stale, PreparedSplit) and stale.labels.tolist() == [0, 1, 5]


def test_prepared_pixel_arrays_equal_the_records_and_data_without_them_still_reads(tmp_path, rng):
    """prepare keeps RAF-DB's decoded images, and AffectNet's crops (one size now), as one array
    per split beside the records (read memory-mapped, not pickled into workers), written from the
    decodes that make the records; images of several sizes stay records only. Data without the
    arrays reads from its records."""
    entries = [(f"train_{i:05d}.jpg", i % 7 + 1, fx.random_image(rng, (100, 100, 3))) for i in range(1, 9)]
    entries.append(("test_0001.jpg", 3, fx.random_image(rng, (100, 100, 3))))
    src, tfds_dir = fx.write_raf_db(tmp_path / "raf", entries), tmp_path / "tfds"
    result = prepare("raf_db", src, tfds_data_dir=tfds_dir)
    arrays = sorted(p.name for p in result.path.glob("pixels-*.npy"))
    assert arrays == ["pixels-test.npy", "pixels-train.npy", "pixels-val.npy"]
    assert not list(result.path.glob("*.partial"))
    split = open_split("raf_db", src, "train", tfds_data_dir=tfds_dir)
    assert split.pixels_path is not None and np.load(split.pixels_path).shape == (8, 100, 100, 3)
    raw = open_split("raf_db", src, "train", prepared=False)
    assert_same(split, raw)
    split[0]  # the array is open in this process now
    copy = pickle.loads(pickle.dumps(split))
    assert len(pickle.dumps(split)) < 8 * 100 * 100 * 3 and copy._pixels is None  # the path, not the pixels
    np.testing.assert_array_equal(copy[5]["image"], raw[5]["image"])
    # An explicit decode size reads the records (decoded to that size), as the raw reader does.
    assert open_split("raf_db", src, "train", tfds_data_dir=tfds_dir, image_size_hint=64).pixels_path is None

    for path in result.path.glob("pixels-*.npy"):
        path.unlink()  # as prepared before the arrays existed
    older = open_split("raf_db", src, "train", tfds_data_dir=tfds_dir)
    assert older.pixels_path is None
    assert_same(older, raw)

    shared = fx.random_image(rng, (90, 80, 3))
    rows = [("1/a.jpg", 0, fx.random_image(rng, (70, 70, 3))), ("1/b.jpg", 1, shared)]
    an = fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows})
    crops = prepare("affectnet7", an, tfds_data_dir=tfds_dir)
    split = open_split("affectnet7", an, "train", tfds_data_dir=tfds_dir)
    assert split.pixels_path is not None and np.load(split.pixels_path).shape == (2, CROP_SIDE, CROP_SIDE, 3)
    records = open_split("affectnet7", an, "train", tfds_data_dir=tfds_dir, image_size_hint=CROP_SIDE)
    for i in range(2):  # the array holds the records' pixels
        np.testing.assert_array_equal(split[i]["image"], records[i]["image"])
    assert_same_crops(split, open_split("affectnet7", an, "train", prepared=False))
    assert not list(crops.path.glob("*.partial"))

    sizes = {"a": [fx.random_image(rng, (40, 30, 3)), fx.random_image(rng, (30, 40, 3))]}
    folder = fx.write_class_folders(tmp_path / "folder", {"train": sizes, "test": sizes})
    mixed = prepare("folder", folder, tfds_data_dir=tfds_dir)
    assert not list(mixed.path.glob("pixels-*")) and not list(mixed.path.glob("*.partial"))
    assert_same(open_split("folder", folder, "train", tfds_data_dir=tfds_dir),
                open_split("folder", folder, "train", prepared=False))


def png_crop(image: np.ndarray) -> bytes:
    """Format 1.1.0's AffectNet record: the crop at its own size as PNG (its `_png`, verbatim)."""
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def prepare_1_1_0(monkeypatch, dataset, src, tfds_dir):
    """prepare as format 1.1.0 did: that version in the fingerprint and the folder, PNG crops.
    What it writes is what 1.1.0's own code wrote (commit 4af9092's prepare, run on the same
    AffectNet CSV, RAF-DB and FER2013 sources, compared once by hand: the files other than the
    records byte for byte, the records' contents equal; the order of a record's tf.Example
    features varies from run to run with either code)."""
    with monkeypatch.context() as patch:
        patch.setattr(tfds_builders, "FORMAT_VERSION", "1.1.0")
        patch.setattr(tfds_builders, "encode_crop", png_crop)
        return prepare(dataset, src, tfds_data_dir=tfds_dir)


def test_data_prepared_in_format_1_1_0_reads_until_prepare_runs_again(tmp_path, rng, monkeypatch, caplog):
    """Found under its own version's fingerprint, read as it was (AffectNet's PNG crops at their
    own size, RAF-DB's and FER2013's pixel arrays), only while the sources are unchanged; prepare
    then writes the current format beside it."""
    shared = fx.random_image(rng, (90, 80, 3))
    rows = [("1/a.jpg", 0, fx.random_image(rng, (70, 70, 3))), ("1/b.jpg", 1, shared),
            ("1/b.jpg", 2, shared, (4, 6, 30, 40))]
    an = fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows[:2]})
    raf = fx.write_raf_db(tmp_path / "raf", [(name, label, fx.random_image(rng, (100, 100, 3))) for name, label in
                                             [("train_00001.jpg", 1), ("train_00002.jpg", 2), ("test_0001.jpg", 3)]])
    fer = tmp_path / "fer"
    fx.write_fer2013_csv(fer / "fer2013.csv", fx.fer2013_rows(rng, per_split=3))
    tfds_dir = tmp_path / "tfds"
    sources = {"affectnet8": an, "raf_db": raf, "fer2013": fer}
    for dataset, src in sources.items():
        old = prepare_1_1_0(monkeypatch, dataset, src, tfds_dir)
        assert old.path.name == "1.1.0" and not old.reused
        metadata = json.loads((old.path / "metadata.json").read_text())
        assert sorted(metadata) == ["class_names", "dropped", "labels", "mode", "skipped"]
        for split in ("train", "test"):
            prepared = open_split(dataset, src, split, tfds_data_dir=tfds_dir)
            assert_same(prepared, open_split(dataset, src, split, prepared=False))  # exactly
            assert (prepared.pixels_path is None) == (dataset == "affectnet8")  # crops of 3 sizes
            if prepared.pixels_path is not None:
                assert prepared.pixels_path.parent == old.path
    crops = open_split("affectnet8", an, "train", tfds_data_dir=tfds_dir)
    assert bytes(crops.source[0]["image"]).startswith(b"\x89PNG")
    copy = pickle.loads(pickle.dumps(crops))  # as grain workers get it: still the 1.1.0 records
    np.testing.assert_array_equal(copy[2]["image"], crops[2]["image"])

    label_file = raf / "EmoLabel" / "list_patition_label.txt"
    original = label_file.read_text()
    label_file.write_text(original.replace("train_00001.jpg 1", "train_00001.jpg 7"))
    assert not isinstance(open_split("raf_db", raf, "train", tfds_data_dir=tfds_dir), PreparedSplit)
    label_file.write_text(original)  # its fingerprint hashes the content: current again
    assert isinstance(open_split("raf_db", raf, "train", tfds_data_dir=tfds_dir), PreparedSplit)

    caplog.set_level(logging.INFO, logger="arm_jax")
    for dataset, src in sources.items():
        new = prepare(dataset, src, tfds_data_dir=tfds_dir)
        assert new.path.name == tfds_builders.FORMAT_VERSION == "1.2.0" and not new.reused
        assert f"{dataset}: the copy prepared in format 1.1.0" in caplog.text
        prepared = open_split(dataset, src, "train", tfds_data_dir=tfds_dir)
        assert prepared.pixels_path.parent == new.path
        if dataset == "affectnet8":
            assert_same_crops(prepared, open_split(dataset, src, "train", prepared=False))
        else:
            assert_same(prepared, open_split(dataset, src, "train", prepared=False))
