"""TFDS builders that turn a data set's raw files into ArrayRecord, read back without TensorFlow.

Each prepared copy is tied to its source: the builder config's name carries a fingerprint
of the label/CSV files' bytes and of every image file's name, size and mtime, so a
corrected source file gets a new config (prepared again), never stale data.
Representation (measured, see scripts/README.md): FER2013's pixels are stored raw (uint8 48x48x1
tensors); image-file data sets store each file's original JPEG/PNG bytes, decoded on access
with the same decoder as the raw reader, so prepared and raw images are identical. AffectNet's
CSV layout stores each row's face crop (the raw reader's, capped at affectnet.CROP_MAX_SIDE)
resized to CROP_SIDE square, as the loader would stage it for a 224 px model, as JPEG quality 90,
4:2:0: within JPEG's error of the raw crop resized so (mean abs difference ~2 grey levels on
photos), no longer equal to it. Read cost per crop, decode + resize to 224 (Xeon family 6 model
167, `scripts/benchmark_crop_formats.py`, real-photo crops of ~230 px): PNG at the crop's size
(format 1.1.0) 2,370 us / 82 KB a record; JPEG q90-95 at the crop's size 920-1,220 us / 15-27
KB (~600 us of it the resize); raw uint8 at the crop's size 610 us / 163 KB; JPEG q90 4:2:0 at
224 x 224 300 us with OpenCV (decode_crop; PIL 360 us, same pixels) / 12 KB: ~3.5 GB for
AffectNet's 287,651 training crops, against 43 GB as raw uint8 at 224.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from arm_jax.data import registry, sources
from arm_jax.data.base import (SPLITS, BadRecord, Problems, decode_image, describe_bad,
                               resize_uint8)
from arm_jax.data.readers import affectnet, fer2013, raf_db
from arm_jax.errors import DatasetError

# Bump when what a prepared record holds changes (1.1.0: canonical class names, AffectNet's
# CSV records are face crops; 1.2.0: those crops as JPEG at CROP_SIDE).
FORMAT_VERSION = "1.2.0"
# Formats still read, newest first: data prepared in one of them is used until `prepare` runs
# again (1.1.0 differs only in AffectNet's CSV crops: PNG, at the crop's own size).
READ_VERSIONS = (FORMAT_VERSION, "1.1.0")
# AffectNet's CSV crops are stored squashed to this square (the model's usual input side, what
# the loader's staging resize would make of them) as JPEG of this quality, chroma 4:2:0.
CROP_SIDE = 224
CROP_JPEG_QUALITY = 90
# ...with this comment, so a record says it is one (is_encoded_crop) in every format version.
CROP_COMMENT = b"arm-jax face crop"
# Beside the ArrayRecord files, `prepare` keeps a split's decoded images as one uint8 array
# (`pixels-<split>.npy`, read memory-mapped) where they all have one shape and fit in this
# many bytes: reading a record is then a copy, with no TFDS deserialisation or decoding.
PIXEL_ARRAY_MAX_BYTES = 4 << 30


@contextlib.contextmanager
def quiet_tfds():
    """Silence TFDS's absl warnings on every open ('Variant folder ... has no
    dataset_info.json', 'Using custom data configuration ...'): they describe our own
    fingerprinted configs, not a problem. Shown when the arm_jax logger is at DEBUG
    (`--verbose`)."""
    absl_logger = logging.getLogger("absl")
    if logging.getLogger("arm_jax").isEnabledFor(logging.DEBUG):
        yield
        return
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def fingerprints(dataset: str, data_dir: Path, versions: tuple[str, ...]) -> dict[str, str]:
    """version -> a short hash of that format and the source files a split is read from
    (content for label files); one walk of the files for all versions."""
    digests = [hashlib.sha256(f"{dataset} {version}".encode()) for version in versions]

    def update(data: bytes) -> None:
        for digest in digests:
            digest.update(data)

    files, folders = registry.spec(dataset).source_files(data_dir)
    for path in files:
        update(f"\0file {path.relative_to(data_dir)}\0".encode())
        if not path.is_file():
            continue  # the reader reports the missing file, with where to get it
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                update(chunk)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                relative = os.path.relpath(os.path.join(dirpath, name), data_dir)
                update(f"\0{relative} {stat.st_size} {stat.st_mtime_ns}".encode())
    return {version: digest.hexdigest()[:16] for version, digest in zip(versions, digests)}


def _verify(root: Path, paths: list[str], mode: str, boxes=None) -> list[str | None]:
    """Full decode of every image (threads: PIL releases the GIL); why each failed, or None.

    With boxes (AffectNet's CSV layout), each image is decoded and cropped to its box.
    """
    def check(args):
        path, box = args
        try:
            if box is None:
                decode_image(root / path, mode)
            else:
                affectnet.face_crop(root / path, box, mode)
        except FileNotFoundError:
            return f"image file is missing: {root / path}"
        except (OSError, SyntaxError, ValueError) as e:
            return f"image file cannot be decoded ({e}): {root / path}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 1)) as pool:
        return list(pool.map(check, zip(paths, [None] * len(paths) if boxes is None else boxes),
                             chunksize=64))


class _SourceBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared builder: records from arm_jax's readers, one config per source fingerprint."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    # tfds 4.9's code_path touches importlib_resources, which it only installs on
    # Python < 3.9; it serves to find download checksums, and nothing is downloaded here.
    code_path = None

    def __init__(self, *, dataset: str, skip_bad: bool = False, **kwargs):
        self._dataset, self._skip_bad = dataset, skip_bad
        with quiet_tfds():
            super().__init__(file_format="array_record", **kwargs)

    # tfds pickles a builder as its constructor's arguments; ours has two more (grain
    # workers unpickle the data source, and with it the builder).
    def __getstate__(self):
        return {"_original_state": self._original_state,
                "_arm": {"dataset": self._dataset, "skip_bad": self._skip_bad}}

    def __setstate__(self, state):
        self.__init__(**state["_arm"], **state["_original_state"])

    def _info(self) -> tfds.core.DatasetInfo:
        pixels = registry.spec(self._dataset).stored_pixels
        if pixels is not None:
            image = tfds.features.Tensor(shape=pixels, dtype=np.uint8)
        else:
            image = tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded file bytes
        return tfds.core.DatasetInfo(
            builder=self, description=f"arm-jax {self._dataset}",
            features=tfds.features.FeaturesDict({"image": image, "label": np.int32}),
            # Record i of a split is record i of the reader, so the labels array below
            # lines up with the data source without decoding anything.
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        if str(self.version) != FORMAT_VERSION:
            raise RuntimeError(f"format {self.version} is read, not written (prepare writes "
                               f"{FORMAT_VERSION})")
        data_dir = Path(dl_manager.manual_dir)
        everything = {}
        bad: list[BadRecord] = []
        for split in SPLITS:
            problems = Problems(f"{self._dataset}/{split} in {data_dir}")
            records = sources.read_records(self._dataset, data_dir, split, problems,
                                           check_images=False)
            keep = np.ones(len(records.labels), dtype=bool)
            boxes = getattr(records, "boxes", None)
            if records.paths is not None:
                for i, (why, path) in enumerate(zip(_verify(records.root, records.paths,
                                                            records.mode, boxes), records.paths)):
                    if why is not None:
                        problems.add(records.root / path, None, why)
                        keep[i] = False
                records.paths = [p for p, k in zip(records.paths, keep) if k]
                if boxes is not None:
                    records.boxes = boxes[keep]
            else:
                records.images = records.images[keep]
            records.labels = records.labels[keep]
            everything[split], bad = (records, problems.bad), bad + problems.bad
        if bad and not self._skip_bad:
            raise DatasetError(describe_bad(f"{self._dataset} in {data_dir}", bad)
                               + "\nFix the files, or prepare with --skip-bad to leave them out.")
        first = everything[SPLITS[0]][0]
        self.info.metadata.update({
            "class_names": list(first.class_names), "mode": first.mode,
            "labels": {s: r.labels.tolist() for s, (r, _) in everything.items()},
            "skipped": {s: [[b.where, b.reason] for b in b_] for s, (_, b_) in everything.items()},
            "dropped": {s: [r.dropped, r.dropped_reason] for s, (r, _) in everything.items()},
        })
        return {split: self._generate_examples(split, records) for split, (records, _) in
                everything.items()}

    def _generate_examples(self, split: str, records):
        """The split's records in the reader's order; its pixel array from the same decodes."""
        pixels = _PixelArray(pixels_path(self.data_dir, split), len(records.labels))
        for i, label in enumerate(records.labels):
            image = None
            if records.paths is None:
                record = image = records.images[i]
            elif getattr(records, "boxes", None) is not None:
                record = encode_crop(affectnet.face_crop(records.root / records.paths[i],
                                                         records.boxes[i], records.mode))
                image = decode_crop(record) if pixels.wanted else None
            else:
                record = (records.root / records.paths[i]).read_bytes()
                image = decode_image(record, records.mode) if pixels.wanted else None
            if image is not None:
                pixels.add(i, image)
            yield i, {"image": record, "label": int(label)}
        pixels.finish()


def encode_crop(crop: np.ndarray) -> bytes:
    """A face crop as its prepared record: resized to CROP_SIDE square (PIL bilinear, the
    loader's staging resize) and JPEG-encoded (CROP_JPEG_QUALITY, 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(resize_uint8(crop, CROP_SIDE)).save(
        buffer, "JPEG", quality=CROP_JPEG_QUALITY, subsampling="4:2:0", comment=CROP_COMMENT)
    return buffer.getvalue()


def is_encoded_crop(data: bytes) -> bool:
    """Whether a record's bytes are an encode_crop JPEG (its comment follows the JFIF header)."""
    return data.startswith(b"\xff\xd8") and CROP_COMMENT in data[:64]


def decode_crop(data: bytes, size: int | None = None) -> np.ndarray:
    """An encode_crop record as uint8 (CROP_SIDE, CROP_SIDE, 3), or resized to size x size.

    OpenCV decodes these JPEGs to the same pixels as PIL (both libjpeg-turbo, islow IDCT, fancy
    upsampling), sooner: no copy out of an image object."""
    import cv2  # not at module level: only readers of prepared crops pay its import

    array = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # OpenCV 4.10+: libjpeg-turbo writes RGB directly
        image = cv2.imdecode(array, cv2.IMREAD_COLOR_RGB)
    else:
        image = cv2.imdecode(array, cv2.IMREAD_COLOR)
        image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise ValueError("a prepared face crop cannot be decoded (damaged file? prepare again)")
    return image if size is None else resize_uint8(image, size)


def pixels_path(data_dir: str | Path, split: str) -> Path:
    """Where a split's pixel array lives, beside its records."""
    return Path(data_dir) / f"pixels-{split}.npy"


class _PixelArray:
    """Writes a split's decoded images, in record order, as one uint8 .npy (renamed into place
    when complete) while they share one shape and fit PIXEL_ARRAY_MAX_BYTES; at the first image
    that does not, it is given up and leaves nothing behind (`wanted` turns False)."""

    def __init__(self, target: Path, count: int):
        self.target, self.count = target, count
        self.partial = target.with_name(target.name + ".partial")
        self.array = None
        self.wanted = count > 0

    def add(self, index: int, image: np.ndarray) -> None:
        if not self.wanted:
            return
        if self.array is None:
            if self.count * image.nbytes > PIXEL_ARRAY_MAX_BYTES:
                self.wanted = False
                return
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.uint8,
                                                   shape=(self.count, *image.shape))
        elif image.shape != self.array.shape[1:]:  # several sizes: the records are the only copy
            self.wanted, self.array = False, None  # closes the file
            self.partial.unlink()
            return
        self.array[index] = image

    def finish(self) -> None:
        """Put the array in place if every image was added."""
        if self.wanted and self.array is not None:
            self.array.flush()
            self.array = None
            self.partial.replace(self.target)


class ArmFer2013(_SourceBuilder):
    """FER2013 and FER+ (raw pixels from fer2013.csv) and FER2013's folder release."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (f"{fer2013.HOW_TO_GET}\n{fer2013.FERPLUS_HOW_TO_GET}\n"
                                    f"Layout:\n{fer2013.FERPLUS_LAYOUT}")


class ArmRafDb(_SourceBuilder):
    """RAF-DB basic emotions as ArrayRecord (original JPEG bytes)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = f"{raf_db.HOW_TO_GET}\nLayout:\n{raf_db.LAYOUT}"


class ArmAffectnet(_SourceBuilder):
    """AffectNet, 7 or 8 classes (the config name says which), as ArrayRecord."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = f"{affectnet.HOW_TO_GET}\nLayout:\n{affectnet.LAYOUT}"


class ArmFolder(_SourceBuilder):
    """A generic labelled image folder as ArrayRecord."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder DIR/<split>/<class_name>/*.jpg|png."


_BUILDERS = (ArmFer2013, ArmRafDb, ArmAffectnet, ArmFolder)


def default_tfds_data_dir(tfds_data_dir: str | Path | None = None) -> Path:
    """tfds_data_dir, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
    chosen = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(chosen).expanduser()


def _builder(dataset: str, data_dir: Path, version: str, fingerprint: str, *,
             tfds_data_dir=None, skip_bad=False):
    cls = next(b for b in _BUILDERS if b.name == registry.spec(dataset).builder)
    config = tfds.core.BuilderConfig(name=f"{dataset}_{fingerprint}", version=version,
                                     description=f"{dataset} from {data_dir}")
    return cls(dataset=dataset, skip_bad=skip_bad, config=config,
               data_dir=str(default_tfds_data_dir(tfds_data_dir)))


def make_builder(dataset: str, data_dir: Path, *, tfds_data_dir=None, skip_bad=False):
    """The builder `prepare` writes with: this format (FORMAT_VERSION), config = dataset +
    fingerprint of the current source files."""
    (fingerprint,) = fingerprints(dataset, data_dir, (FORMAT_VERSION,)).values()
    return _builder(dataset, data_dir, FORMAT_VERSION, fingerprint, tfds_data_dir=tfds_data_dir,
                    skip_bad=skip_bad)


def find_prepared(dataset: str, data_dir: Path, *, tfds_data_dir=None):
    """The builder of the data prepared from the current source files in the newest format still
    read (READ_VERSIONS), or None if there is none."""
    for version, fingerprint in fingerprints(dataset, data_dir, READ_VERSIONS).items():
        builder = _builder(dataset, data_dir, version, fingerprint, tfds_data_dir=tfds_data_dir)
        if builder.is_prepared():
            return builder
    return None
