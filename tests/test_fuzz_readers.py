"""Readers and image decoding under generated hostile input (hypothesis).

Each test writes a small data set in its real format, with valid rows mixed with mutated
ones, and checks one property against an oracle written here from the formats' rules: every
input line either becomes a record with the right label (and pixels), or is reported as a
bad record naming its file and line; nothing else escapes. Inputs that once broke a reader
are pinned with @example.
"""

import functools
import io
import re
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from arm_jax.data.base import MAX_IMAGE_PIXELS, Problems, decode_image  # noqa: E402
from arm_jax.data.sources import open_raw, read_records  # noqa: E402
from arm_jax.errors import DatasetError  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
USAGES = ("Training", "PublicTest", "PrivateTest")
# Field text without line breaks or quotes (a quote makes a CSV field legitimately
# something else); commas stay: they shift the columns and must be caught.
FIELD = st.text(alphabet=st.characters(codec="latin-1", exclude_characters='\r\n"\x0b\x0c\x1c\x1d\x1e\x85'),
                max_size=6)


def _ascii_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _reported_lines(problems: Problems, file: Path) -> set[int]:
    lines = set()
    for bad in problems.bad:
        match = re.fullmatch(rf"{re.escape(str(file))}:(\d+)", bad.where)
        if match:
            lines.add(int(match[1]))
    return lines


# -- FER2013 -------------------------------------------------------------------------------

PIXEL_MUTATIONS = st.one_of(
    st.just(("none", None)), st.just(("drop", None)), st.just(("extra", None)),
    st.tuples(st.just("token"), FIELD.filter(lambda t: t.strip() and not t.strip().isdigit())),
    st.tuples(st.just("value"), st.integers(256, 10**12).map(str)),
    st.tuples(st.just("value"), st.sampled_from(["-1", "1e3", "0x10", "²", "3.5", "¹"])),
)
FER_ROWS = st.lists(st.tuples(
    st.one_of(st.integers(0, 6).map(str), st.integers(0, 6).map(lambda i: f" {i} "), FIELD,
              st.sampled_from(["7", "²", "³", "-1", "06"])),
    st.integers(0, 2**16), PIXEL_MUTATIONS,
    st.one_of(st.sampled_from(USAGES), FIELD)), min_size=1, max_size=12)


def _pixels(seed: int, mutation) -> tuple[str, np.ndarray | None]:
    values = np.random.default_rng(seed).integers(0, 256, 48 * 48)
    tokens = [str(v) for v in values]
    kind, arg = mutation
    if kind == "none":
        return " ".join(tokens), values.astype(np.uint8).reshape(48, 48, 1)
    if kind == "drop":
        tokens.pop(seed % len(tokens))
    elif kind == "extra":
        tokens.append("7")
    else:
        tokens[seed % len(tokens)] = arg
    return " ".join(tokens), None


@FUZZ
@given(rows=FER_ROWS, split=st.sampled_from(["train", "val", "test"]))
@example(rows=[("²", 1, ("none", None), "Training")], split="train")  # int('²') escaped (bug)
@example(rows=[("3", 1, ("value", "¹"), "Training")], split="train")  # StopIteration (bug)
def test_fer2013_rows_read_right_or_are_reported(rows, split):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fer2013.csv"
        lines, expected, must_report = ["emotion,pixels,Usage"], [], set()
        for line_number, (label, seed, mutation, usage) in enumerate(rows, start=2):
            text, pixels = _pixels(seed, mutation)
            lines.append(f"{label},{text},{usage}")
            fields_ok = "," not in label + usage
            usage_ok = usage.strip() in USAGES
            if not fields_ok or not usage_ok:
                must_report.add(line_number)
                continue
            if usage.strip() != {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}[split]:
                continue
            value = _ascii_int(label)
            if value is None or value > 6 or pixels is None:
                must_report.add(line_number)
            else:
                expected.append((value, pixels))
        path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
        problems = Problems("fuzz")
        records = read_records("fer2013", Path(tmp), split, problems)
        assert [int(x) for x in records.labels] == [label for label, _ in expected]
        for image, (_, pixels) in zip(records.images, expected, strict=True):
            assert np.array_equal(image, pixels)
        assert _reported_lines(problems, path) == must_report


# -- FER+ ----------------------------------------------------------------------------------

def _ferplus_oracle(votes: list[int]) -> int | None:
    """FERPlus's majority rule, from its paper and code: drop single votes; the top class
    needs more than half the rest; 'unknown' (8) and 'NF' (9) are no label."""
    kept = [v if v > 1 else 0 for v in votes]
    best = max(kept)
    top = kept.index(best)
    return top if best > 0 and 2 * best > sum(kept) and top < 8 else None


@FUZZ
@given(rows=st.lists(st.tuples(
    st.sampled_from(["fer0000001.png", "", " "]),
    st.lists(st.one_of(st.integers(0, 10).map(str), st.integers(0, 10).map(str),
                       FIELD, st.sampled_from(["²", "-1", "1.0"])), min_size=10, max_size=10),
    st.booleans()), min_size=1, max_size=10))
@example(rows=[("fer0000001.png", ["²"] + ["0"] * 9, False)])  # np.asarray(['²'], int) escaped (bug)
def test_ferplus_votes_read_right_or_are_reported(rows):
    with tempfile.TemporaryDirectory() as tmp:
        old = ["emotion,pixels,Usage"]
        new = ["Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"]
        expected, must_report, new_path = [], set(), Path(tmp) / "fer2013new.csv"
        for line_number, (name, votes, wrong_usage) in enumerate(rows, start=2):
            old.append("0," + " ".join(["9"] * 48 * 48) + ",Training")
            new.append(",".join(["PublicTest" if wrong_usage else "Training", name, *votes]))
            if any("," in v for v in votes) or wrong_usage:
                must_report.add(line_number)
            elif not name.strip():
                continue  # FER+ leaves it out
            elif any(_ascii_int(v) is None for v in votes):
                must_report.add(line_number)
            elif (label := _ferplus_oracle([_ascii_int(v) for v in votes])) is not None:
                expected.append(label)
        (Path(tmp) / "fer2013.csv").write_text("\n".join(old) + "\n")
        new_path.write_bytes("\n".join(new).encode("latin-1") + b"\n")
        problems = Problems("fuzz")
        records = read_records("ferplus", Path(tmp), "train", problems)
        assert [int(x) for x in records.labels] == expected
        assert _reported_lines(problems, new_path) == must_report


# -- RAF-DB --------------------------------------------------------------------------------

RAF_LINES = st.lists(st.one_of(
    st.tuples(st.sampled_from(["train", "test"]), st.integers(1, 30), st.integers(1, 7).map(str)),
    st.tuples(st.sampled_from(["train", "test"]), st.integers(1, 30),
              st.one_of(FIELD, st.sampled_from(["0", "8", "²", "٣", "1 2", "07"]))),
    FIELD.map(lambda t: ("raw", 0, t)),
    st.binary(max_size=12).map(lambda b: ("bytes", 0, b)),
), min_size=1, max_size=10)


@FUZZ
@given(lines=RAF_LINES, split=st.sampled_from(["train", "test"]))
@example(lines=[("bytes", 0, b"\xff\xfe")], split="train")  # UnicodeDecodeError escaped (bug)
@example(lines=[("train", 1, "²")], split="train")  # int('²') escaped (bug)
def test_raf_db_label_lines_read_right_or_are_reported(lines, split):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        label_file = root / "EmoLabel" / "list_patition_label.txt"
        (root / "Image" / "aligned").mkdir(parents=True)
        label_file.parent.mkdir(parents=True)
        raw, expected, must_report = [], [], set()
        image = np.full((8, 8, 3), 128, np.uint8)
        for line_number, (kind, number, label) in enumerate(lines, start=1):
            if kind == "bytes":
                raw.append(label)
                fields = label.decode("utf-8", "replace").split()
            else:
                text = f"{label}" if kind == "raw" else f"{kind}_{number:05d}.jpg {label}"
                raw.append(text.encode("utf-8"))
                fields = text.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].lower().endswith(".jpg") or \
                    not fields[0].startswith(("train_", "test_")):
                must_report.add(line_number)
                continue
            if not fields[0].startswith(f"{split}_"):
                continue
            value = _ascii_int(fields[1])
            if value is None or not 1 <= value <= 7 or fields[1] != fields[1].strip():
                must_report.add(line_number)
                continue
            stem = fields[0][:-4]
            if set(stem) <= set(string.ascii_letters + string.digits + "_"):
                Image.fromarray(image).save(root / "Image" / "aligned" / f"{stem}_aligned.jpg")
                expected.append(value - 1)
            else:
                must_report.add(line_number)  # no such image
        label_file.write_bytes(b"\n".join(raw) + b"\n")
        problems = Problems("fuzz")
        records = read_records("raf_db", root, split, problems)
        assert [int(x) for x in records.labels] == expected
        assert _reported_lines(problems, label_file) == must_report


# -- AffectNet -----------------------------------------------------------------------------

@FUZZ
@given(rows=st.lists(st.tuples(
    st.one_of(st.integers(0, 10).map(str), FIELD, st.sampled_from(["²", "11", "-1", "3.0"])),
    st.one_of(st.just(None), FIELD), st.booleans()), min_size=1, max_size=8))
@example(rows=[("²", None, True)])  # int('²') escaped (bug)
def test_affectnet_csv_rows_read_right_or_are_reported(rows):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lists = root / "Manually_Annotated_file_lists"
        lists.mkdir()
        (root / "Manually_Annotated_Images" / "1").mkdir(parents=True)
        lines = ["subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                 "expression,valence,arousal"]
        expected, must_report = [], set()
        for line_number, (expression, box_text, image_exists) in enumerate(rows, start=2):
            name = f"1/face{line_number}.jpg"
            if image_exists:
                Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(root / "Manually_Annotated_Images" / name)
            box = box_text if box_text is not None else "4,4,32,32"
            lines.append(f"{name},{box},1.0;2.0,{expression},0.1,-0.2")
            if "," in expression or (box_text is not None and box_text.count(",") != 3):
                must_report.add(line_number)
                continue
            code = _ascii_int(expression)
            if code is None or code > 10:
                must_report.add(line_number)
            elif code >= 7:
                continue  # the 7-class protocol's drop
            elif box_text is not None and not _valid_box(box_text):
                must_report.add(line_number)
            elif not image_exists:
                must_report.add(line_number)
            else:
                expected.append(code)
        (lists / "training.csv").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
        problems = Problems("fuzz")
        records = read_records("affectnet7", root, "train", problems)
        assert [int(x) for x in records.labels] == expected
        assert _reported_lines(problems, lists / "training.csv") == must_report


def _valid_box(text: str) -> bool:
    parts = text.split(",")
    try:
        x, y, w, h = (int(p.strip()) for p in parts)
    except ValueError:
        return False
    return w > 0 and h > 0 and x < 40 and y < 40 and x + w > 0 and y + h > 0


def _npy_bytes(kind: str, value) -> bytes:
    buffer = io.BytesIO()
    if kind == "str":
        np.save(buffer, np.array(str(value)))
    elif kind == "int":
        np.save(buffer, np.array(value))
    elif kind == "float":
        np.save(buffer, np.array(float(value)))
    elif kind == "object":
        np.save(buffer, np.array([value], dtype=object), allow_pickle=True)
    elif kind == "empty_array":
        np.save(buffer, np.zeros((0,)))
    elif kind == "huge_header":  # claims 10^12 float64 values, holds none
        np.save(buffer, np.array(1.0))
        return buffer.getvalue().replace(b"'shape': ()", b"'shape': (1000000000000,)")
    elif kind == "truncated":
        np.save(buffer, np.arange(100))
        return buffer.getvalue()[:90]
    elif kind == "garbage":
        return bytes(value)
    return buffer.getvalue()


@FUZZ
@given(annotations=st.lists(st.one_of(
    st.tuples(st.sampled_from(["str", "int"]), st.integers(0, 10)),
    st.tuples(st.just("str"), FIELD),
    st.tuples(st.sampled_from(["float", "object", "empty_array", "huge_header", "truncated", "missing"]),
              st.integers(0, 10)),
    st.tuples(st.just("garbage"), st.binary(max_size=40).map(list)),
), min_size=1, max_size=8))
@example(annotations=[("huge_header", 0)])  # np.load tried to allocate 8 TB (MemoryError, bug)
@example(annotations=[("str", "²")])  # int('²') escaped (bug)
@example(annotations=[("garbage", [])])  # an empty .npy: EOFError escaped (bug)
def test_affectnet_npy_annotations_read_right_or_are_reported(annotations):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, notes = root / "train_set" / "images", root / "train_set" / "annotations"
        images.mkdir(parents=True)
        notes.mkdir()
        expected, must_report = [], set()
        for number, (kind, value) in enumerate(annotations):
            Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(images / f"{number}.jpg")
            npy = notes / f"{number}_exp.npy"
            if kind != "missing":
                npy.write_bytes(_npy_bytes(kind, value))
            code = _ascii_int(str(value)) if kind in ("str", "int") else None
            if code is not None and code <= 10:
                if code < 7:
                    expected.append(code)
            else:
                must_report.add(str(npy))
        problems = Problems("fuzz")
        records = read_records("affectnet7", root, "train", problems)
        assert [int(x) for x in records.labels] == expected
        assert {bad.where for bad in problems.bad} == must_report


# -- image files ---------------------------------------------------------------------------

IMAGE_KINDS = ("rgb_png", "rgb_jpg", "gray_png", "cmyk_jpg", "png16", "rgba_png", "palette_png",
               "la_png", "png_named_jpg", "empty", "truncated", "random_bytes", "bomb")


def _image_file(kind: str, seed: int) -> tuple[bytes, str, np.ndarray | None]:
    """(file bytes, suffix, the RGB pixels a correct decoder gives, or None if unusable)."""
    rng = np.random.default_rng(seed)
    # Flat 16 px squares: JPEG's 16 px chroma blocks keep them within a few grey levels.
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8), 16, 0), 16, 1)
    buffer = io.BytesIO()
    if kind in ("rgb_png", "png_named_jpg", "truncated"):
        Image.fromarray(rgb).save(buffer, "PNG")
        data = buffer.getvalue()
        if kind == "truncated":  # may still decode right when only the end chunk is cut
            return data[: 8 + seed % max(len(data) - 8, 1)], ".png", rgb
        return data, ".jpg" if kind == "png_named_jpg" else ".png", rgb
    if kind == "rgb_jpg":
        Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
        return buffer.getvalue(), ".jpg", rgb
    if kind == "gray_png":
        Image.fromarray(rgb[..., 0]).save(buffer, "PNG")
        return buffer.getvalue(), ".png", np.repeat(rgb[..., :1], 3, -1)
    if kind == "cmyk_jpg":
        Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
        return buffer.getvalue(), ".jpg", rgb
    if kind == "png16":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buffer, "PNG")
        return buffer.getvalue(), ".png", np.repeat(rgb[..., :1], 3, -1)
    if kind == "rgba_png":
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(buffer, "PNG")
        return buffer.getvalue(), ".png", rgb
    if kind == "palette_png":
        Image.fromarray(rgb).quantize(16).save(buffer, "PNG")
        palette = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return buffer.getvalue(), ".png", palette
    if kind == "la_png":
        Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(buffer, "PNG")
        return buffer.getvalue(), ".png", np.repeat(rgb[..., :1], 3, -1)
    if kind == "empty":
        return b"", ".jpg", None
    if kind == "random_bytes":
        return rng.bytes(200), ".png", None
    return _bomb(), ".png", None


@functools.cache
def _bomb() -> bytes:
    """A decompression bomb: 20000x20000 1-bit pixels in ~50 KB of PNG."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.tuples(st.sampled_from(IMAGE_KINDS), st.integers(0, 1000)), min_size=1, max_size=6),
       skip_bad=st.booleans())
@example(kinds=[("bomb", 0)], skip_bad=False)  # DecompressionBombError escaped `prepare` (bug)
@example(kinds=[("png16", 3)], skip_bad=False)  # 16-bit gray clipped to white (bug)
def test_image_files_decode_right_or_are_refused_naming_the_file(kinds, skip_bad):
    """A `folder` data set of generated files: a good file decodes to its pixels (JPEG within
    its loss); a bad one is refused (or skipped) naming it, at open or at decode time."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split in ("train", "test"):
            (root / split / "b").mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / split / "b" / "ok.png")
        (root / "train" / "a").mkdir()
        files = {}
        for i, (kind, seed) in enumerate(kinds):
            data, suffix, pixels = _image_file(kind, seed)
            path = root / "train" / "a" / f"{i:02d}{suffix}"
            path.write_bytes(data)
            files[path] = (kind, pixels)
        bad = {p for p, (_, pixels) in files.items() if pixels is None}
        maybe = {p for p, (kind, _) in files.items() if kind == "truncated"}
        try:
            split = open_raw("folder", root, "train", skip_bad=skip_bad)
        except DatasetError as error:
            assert (bad or maybe) and not skip_bad
            named = {p for p in files if str(p) in str(error)}
            assert bad <= named <= bad | maybe or len(bad) > 5, str(error)
            return
        skipped = {Path(b.where) for b in split.report.skipped}
        assert bad <= skipped <= bad | maybe
        for i in range(len(split)):
            path = split.root / split.paths[i]
            if path.parent.name == "b":
                continue
            kind, pixels = files[path]
            try:
                image = split[i]["image"]
            except DatasetError as error:  # the backstop at decode time
                assert kind == "truncated" and str(path) in str(error)
                continue
            error = np.abs(image.astype(int) - pixels)
            assert image.shape == pixels.shape, kind
            if kind.endswith("jpg") and kind != "png_named_jpg":  # lossy: ringing at the edges
                assert error.mean() <= 8, kind  # a wrong decode is ~85 off
            else:
                assert error.max() == 0, kind


def test_a_decompression_bomb_is_refused_from_its_header():
    """20000 x 20000 pixels in ~50 KB: refused before decoding (no 400 MB allocation)."""
    assert 20000 * 20000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="too many pixels|more than the limit"):
        decode_image(_bomb(), "RGB")
