"""TFDS builders that turn a data set's raw files into ArrayRecord, read back without TensorFlow.

Each prepared copy is tied to its source: the builder config's name carries a fingerprint
of the label/CSV files' bytes and of every image file's name, size and mtime, so a
corrected source file gets a new config (prepared again), never stale data.
Representation (measured, see scripts/README.md): FER2013's pixels are stored raw (uint8 48x48x1
tensors); image-file data sets store each file's original JPEG/PNG bytes, decoded on access
with the same decoder as the raw reader, so prepared and raw images are identical. AffectNet's
CSV layout stores each row's face crop (capped at affectnet.CROP_MAX_SIDE) as PNG: lossless,
so equal to the raw reader's crop too.
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
from arm_jax.data.base import SPLITS, BadRecord, Problems, decode_image, describe_bad
from arm_jax.data.readers import affectnet, fer2013, raf_db
from arm_jax.errors import DatasetError

# Bump when what a prepared record holds changes (1.1.0: canonical class names, AffectNet's
# CSV records are face crops).
FORMAT_VERSION = "1.1.0"
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


def fingerprint(dataset: str, data_dir: Path) -> str:
    """A short hash of the source files a split is read from (content for label files)."""
    digest = hashlib.sha256(f"{dataset} {FORMAT_VERSION}".encode())
    files, folders = registry.spec(dataset).source_files(data_dir)
    for path in files:
        digest.update(f"\0file {path.relative_to(data_dir)}\0".encode())
        if not path.is_file():
            continue  # the reader reports the missing file, with where to get it
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                relative = os.path.relpath(os.path.join(dirpath, name), data_dir)
                digest.update(f"\0{relative} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


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
                image = affectnet.face_crop(records.root / records.paths[i], records.boxes[i],
                                            records.mode)
                record = _png(image)  # lossless: the crop is what decoding it gives
            else:
                record = (records.root / records.paths[i]).read_bytes()
                image = decode_image(record, records.mode) if pixels.wanted else None
            if image is not None:
                pixels.add(i, image)
            yield i, {"image": record, "label": int(label)}
        pixels.finish()


def _png(image: np.ndarray) -> bytes:
    """uint8 HxWxC as PNG bytes (lossless: decoding gives the same pixels back)."""
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


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


def make_builder(dataset: str, data_dir: Path, *, tfds_data_dir=None, skip_bad=False):
    """The builder for dataset's current source files (config = dataset + fingerprint)."""
    cls = next(b for b in _BUILDERS if b.name == registry.spec(dataset).builder)
    config = tfds.core.BuilderConfig(name=f"{dataset}_{fingerprint(dataset, data_dir)}",
                                     description=f"{dataset} from {data_dir}")
    return cls(dataset=dataset, skip_bad=skip_bad, config=config,
               data_dir=str(default_tfds_data_dir(tfds_data_dir)))
