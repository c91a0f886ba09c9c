"""AffectNet's CSV layout: a record is its row's face box (inside the file's margin), prepared too
(as JPEG at the staging side)."""

import io

import numpy as np
import pytest
from PIL import Image

from arm_jax.data import tfds_builders
from arm_jax.data.base import decode_image, resize_uint8
from arm_jax.data.prepared import PreparedSplit, prepare
from arm_jax.data.readers.affectnet import CROP_MAX_SIDE, face_crop
from arm_jax.data.tfds_builders import CROP_SIDE
from arm_jax.data.sources import decode_size_hint
from arm_jax.data.splits import open_split
from arm_jax.errors import DatasetError
from tests import fixtures as fx

IMAGES = "Manually_Annotated_Images"


@pytest.fixture
def rng():
    return np.random.default_rng(8)


def raw(dataset, data_dir, split, **kwargs):
    return open_split(dataset, data_dir, split, prepared=False, **kwargs)


def decoded(root, path):
    """The file as PIL decodes it, uint8 HxWx3 (the second implementation the crop is held to)."""
    with Image.open(root / IMAGES / path) as im:
        return np.asarray(im.convert("RGB"))


def rows_with_margins(rng):
    """Faces inside a margin, one file listed twice with two boxes, one box past the edge."""
    shared = fx.random_image(rng, (90, 80, 3))
    return [("1/a.jpg", 0, fx.random_image(rng, (70, 70, 3))),
            ("1/b.jpg", 1, shared),
            ("1/b.jpg", 2, shared, (4, 6, 30, 40)),                     # same file, another face
            ("2/c.jpg", 3, fx.random_image(rng, (60, 50, 3)), (-5, 10, 40, 70))]  # clipped


def test_record_is_the_face_box_content(tmp_path, rng):
    rows = rows_with_margins(rng)
    fx.write_affectnet_csv(tmp_path, {"training": rows, "validation": rows[:1]})
    split = raw("affectnet8", tmp_path, "train")
    assert split.labels.tolist() == [0, 1, 2, 3]
    for record, (path, _, image, *box) in zip(split, rows, strict=True):
        x, y, w, h = box[0] if box else fx.margin_box(image.shape)
        whole = decoded(tmp_path, path)
        expected = whole[max(y, 0):y + h, max(x, 0):x + w]  # numpy clips the far edges
        np.testing.assert_array_equal(record["image"], expected)
    # The two boxes of 1/b.jpg are two different records, neither of them the whole file.
    b1, b2 = split[1]["image"], split[2]["image"]
    assert b1.shape == (70, 62, 3) and b2.shape == (40, 30, 3)
    assert b1.shape != decoded(tmp_path, "1/b.jpg").shape
    assert split[3]["image"].shape == (50, 35, 3)  # -5..35 clipped to 0..35, 10..80 to 10..60


def test_invalid_boxes_are_named_bad_records(tmp_path, rng):
    image = fx.random_image(rng, (50, 50, 3))
    rows = [("1/ok.jpg", 0, image),
            ("1/neg.jpg", 1, image, (5, 5, -20, 30)),
            ("1/nan.jpg", 2, image, (5, 5, "x", 30)),
            ("1/frac.jpg", 4, image, (5, 5, "30.5", 30)),
            ("1/out.jpg", 3, image, (60, 5, 20, 20))]  # starts right of the 50 px image
    fx.write_affectnet_csv(tmp_path, {"training": rows, "validation": rows[:1]})
    csv_path = tmp_path / "Manually_Annotated_file_lists" / "training.csv"
    with pytest.raises(DatasetError) as error:
        raw("affectnet8", tmp_path, "train")
    message = str(error.value)
    assert "4 bad record(s)" in message
    assert f"{csv_path}:3: invalid face box 5,5,-20,30 (width and height must be positive)" in message
    assert f"{csv_path}:4: invalid face box 5,5,x,30" in message
    assert f"{csv_path}:5: invalid face box 5,5,30.5,30 (x,y,width,height must be whole" in message
    assert f"{csv_path}:6: invalid face box 60,5,20,20: it lies outside the 50x50 image" in message
    kept = raw("affectnet8", tmp_path, "train", skip_bad=True)
    assert kept.labels.tolist() == [0] and len(kept.report.skipped) == 4


def test_large_crops_are_capped_before_augmentation(tmp_path, rng):
    big = fx.random_image(rng, (700, 600, 3))
    fx.write_affectnet_csv(tmp_path, {"training": [("9/big.jpg", 4, big)], "validation": []})
    x, y, w, h = fx.margin_box(big.shape)
    crop = raw("affectnet7", tmp_path, "train",
               image_size_hint=decode_size_hint("affectnet7", 224))[0]["image"]
    scale = CROP_MAX_SIDE / max(w, h)
    assert crop.shape == (CROP_MAX_SIDE, round(w * scale), 3)
    expected = Image.fromarray(decoded(tmp_path, "9/big.jpg")[y:y + h, x:x + w]).resize(
        (crop.shape[1], crop.shape[0]), Image.BILINEAR)
    np.testing.assert_array_equal(crop, np.asarray(expected))


def test_prepare_stores_the_crops_as_jpeg_at_the_staging_side(tmp_path, rng):
    """Prepared crops: the raw reader's crop resized to CROP_SIDE, within JPEG's error (a box one
    pixel off is not); a decode size resizes them; the labels are the raw reader's."""
    rows = rows_with_margins(rng)
    src = fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows[:2]})
    prepare("affectnet8", src, tfds_data_dir=tmp_path / "tfds")
    for split in ("train", "test"):
        prepared = open_split("affectnet8", src, split, tfds_data_dir=tmp_path / "tfds")
        plain = raw("affectnet8", src, split)
        assert isinstance(prepared, PreparedSplit) and prepared.class_names == plain.class_names
        np.testing.assert_array_equal(prepared.labels, plain.labels)
        for i in range(len(plain)):
            image = prepared[i]["image"]
            assert image.shape == (CROP_SIDE, CROP_SIDE, 3)
            assert fx.crop_error(image, plain[i]["image"]) <= fx.PREPARED_CROP_MEAN_ERROR
    record = bytes(open_split("affectnet8", src, "train", tfds_data_dir=tmp_path / "tfds").source[0]["image"])
    assert tfds_builders.is_encoded_crop(record)  # read by decode_crop
    train = raw("affectnet8", src, "train")
    x, y, w, h = fx.margin_box(rows[0][2].shape)
    off_by_one = face_crop(src / IMAGES / rows[0][0], (x + 1, y, w, h), "RGB")
    first = open_split("affectnet8", src, "train", tfds_data_dir=tmp_path / "tfds")[0]["image"]
    assert fx.crop_error(first, off_by_one) > 2 * fx.PREPARED_CROP_MEAN_ERROR
    assert fx.crop_error(first, train[1]["image"]) > 10 * fx.PREPARED_CROP_MEAN_ERROR
    small = open_split("affectnet8", src, "train", tfds_data_dir=tmp_path / "tfds", image_size_hint=40)
    np.testing.assert_array_equal(small[2]["image"], resize_uint8(
        open_split("affectnet8", src, "train", tfds_data_dir=tmp_path / "tfds")[2]["image"], 40))
    fx.write_affectnet_csv(tmp_path / "bad", {"training": rows + [("1/a.jpg", 5, None,
                                                                   (0, 0, 0, 9))],
                                              "validation": rows[:1]})
    with pytest.raises(DatasetError, match="training.csv:6: invalid face box 0,0,0,9"):
        prepare("affectnet8", tmp_path / "bad", tfds_data_dir=tmp_path / "tfds")


def test_decode_crop_gives_pil_s_pixels(rng, monkeypatch):
    """OpenCV decodes encode_crop's JPEGs to PIL's pixels (the raw reader's decoder), with and
    without IMREAD_COLOR_RGB (OpenCV before 4.10); a damaged record is an error, not grey."""
    import cv2

    crops = [fx.random_image(rng, shape) for shape in ((60, 50, 3), (256, 200, 3), (30, 90, 3))]
    records = [tfds_builders.encode_crop(crop) for crop in crops]
    assert all(tfds_builders.is_encoded_crop(r) for r in records)
    expected = [decode_image(r, "RGB") for r in records]
    for record, pixels in zip(records, expected, strict=True):
        np.testing.assert_array_equal(tfds_builders.decode_crop(record), pixels)
    monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    for record, pixels in zip(records, expected, strict=True):
        np.testing.assert_array_equal(tfds_builders.decode_crop(record), pixels)
    with pytest.raises(ValueError, match="cannot be decoded"):
        tfds_builders.decode_crop(records[0][:len(records[0]) // 2])
    original = io.BytesIO()
    Image.fromarray(crops[0]).save(original, "JPEG")
    assert not tfds_builders.is_encoded_crop(original.getvalue())  # nor is an original file


def test_loader_augments_crops_then_stages_them(tmp_path, rng):
    """Crops of several sizes go through flip/noise at their own size, then to one staging size."""
    from arm_jax.data import make_loader

    rows = rows_with_margins(rng)
    fx.write_affectnet_csv(tmp_path, {"training": rows, "validation": rows[:1]})
    split = raw("affectnet8", tmp_path, "train", image_size_hint=decode_size_hint("affectnet8", 48))
    assert len({split[i]["image"].shape for i in range(len(split))}) == 4  # native crop sizes
    batches = list(make_loader(split, batch_size=2, seed=0, epoch=0, train=True, image_size=48))
    assert [b["image"].shape for b in batches] == [(2, 48, 48, 3)] * 2
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == [0, 1, 2, 3]


def test_tfds_warnings_are_hidden_unless_verbose(tmp_path, rng):
    """TFDS warns on every open of our fingerprinted configs; only the arm_jax DEBUG level shows it."""
    import logging

    rows = rows_with_margins(rng)
    src = fx.write_affectnet_csv(tmp_path / "an", {"training": rows, "validation": rows[:1]})
    prepare("affectnet8", src, tfds_data_dir=tmp_path / "tfds")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    absl_logger, ours = logging.getLogger("absl"), logging.getLogger("arm_jax")
    absl_logger.addHandler(handler)
    level = ours.level
    try:
        for verbose in (False, True):
            ours.setLevel(logging.DEBUG if verbose else logging.INFO)
            seen.clear()
            split = open_split("affectnet8", src, "train", tfds_data_dir=tmp_path / "tfds")
            assert isinstance(split, PreparedSplit)
            assert any("Using custom data configuration" in m for m in seen) == verbose, seen
    finally:
        absl_logger.removeHandler(handler)
        ours.setLevel(level)
