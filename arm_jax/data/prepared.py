"""prepare (raw files -> ArrayRecord via TFDS) and the LabelledSplit that reads the result."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from arm_jax.data import sources, tfds_builders
from arm_jax.data.base import BadRecord, LabelledSplit, SplitReport, decode_image, describe_bad
from arm_jax.errors import DatasetError, UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """Where prepare wrote a data set, its split sizes and what it left out."""

    path: Path
    sizes: dict[str, int]
    skipped: dict[str, int]
    dropped: dict[str, int]
    reused: bool  # the data was already prepared from these exact source files


class PreparedSplit(LabelledSplit):
    """A split read from prepared data: its pixel array when `prepare` wrote one (and no decode
    size is asked for), else the ArrayRecord files through tfds' random-access data source."""

    def __init__(self, name, class_names, labels, source, mode: str, size: int | None,
                 report=SplitReport(), pixels: Path | None = None):
        super().__init__(name, class_names, labels, report)
        self.source, self.mode, self.size = source, mode, size
        self.pixels_path = pixels if size is None else None
        self._pixels = None  # opened on first use, in each process (a memory map does not pickle)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def read_images(self, indices: np.ndarray):
        if self.pixels_path is not None:
            return np.asarray(self._pixel_array()[np.asarray(indices)])  # a gather: one copy, no decoding
        # One call for the batch's records: tfds' per-call work is paid once (98 against 173 us a
        # record for AffectNet's crops, measured 2026-12-07 on a 2-core Xeon).
        return [self._decoded(record["image"]) for record in self.source.__getitems__([int(i) for i in indices])]

    def _pixel_array(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
        return self._pixels

    def image(self, index: int) -> np.ndarray:
        if self.pixels_path is not None:
            return np.array(self._pixel_array()[index])
        return self._decoded(self.source[index]["image"])

    def _decoded(self, image) -> np.ndarray:
        """A record's image: stored pixels as they are, stored bytes decoded."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            return image
        data = bytes(image)
        if tfds_builders.is_encoded_crop(data):  # AffectNet's face crops (format 1.2.0 on)
            return tfds_builders.decode_crop(data, self.size)
        # Original file bytes (or a format 1.1.0 PNG crop), already fully decoded once by
        # prepare: same decoder as raw.
        return decode_image(data, self.mode, self.size)


def _skipped(metadata, split: str) -> tuple[BadRecord, ...]:
    return tuple(BadRecord(where, reason) for where, reason in metadata["skipped"][split])


def open_prepared(dataset: str, data_dir: Path, split: str, *, skip_bad: bool = False,
                  tfds_data_dir=None, image_size_hint: int | None = None) -> LabelledSplit | None:
    """The prepared split if prepare ran on the current source files (in this format or an
    older one still read: tfds_builders.READ_VERSIONS), else None."""
    with tfds_builders.quiet_tfds():
        builder = tfds_builders.find_prepared(dataset, data_dir, tfds_data_dir=tfds_data_dir)
    if builder is None:
        return None
    metadata = builder.info.metadata
    skipped = _skipped(metadata, split)
    if skipped and not skip_bad:
        # Prepared with --skip-bad: opening without it must fail as the raw files would.
        raise DatasetError(describe_bad(f"{dataset}/{split} in {data_dir}", skipped)
                           + "\n(prepared with --skip-bad; pass skip_bad=True / --skip-bad to "
                           "use the data without them, or fix the files)")
    dropped, reason = metadata["dropped"][split]
    with tfds_builders.quiet_tfds():
        source = builder.as_data_source(split=split)
    pixels = tfds_builders.pixels_path(builder.data_dir, split)
    return PreparedSplit(f"{dataset}/{split}", tuple(metadata["class_names"]),
                         np.asarray(metadata["labels"][split], np.int32), source, metadata["mode"],
                         image_size_hint, SplitReport(skipped, dropped, reason),
                         pixels=pixels if pixels.is_file() else None)


def prepare(dataset: str, data_dir: str | Path, *, tfds_data_dir: str | Path | None = None,
            skip_bad: bool = False) -> PrepareResult:
    """Decode-check every record of every split and write them as ArrayRecord with TFDS.

    Bad records raise one DatasetError listing them all, before anything is written,
    unless skip_bad (then they are left out, logged, and kept in the metadata).
    tfds_data_dir defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    """
    if dataset == "synthetic":
        raise UserError("--dataset synthetic is drawn on the fly; there is nothing to prepare")
    sources.check_names(dataset, "train")
    data_dir = sources.data_dir_of(dataset, data_dir)
    with tfds_builders.quiet_tfds():
        builder = tfds_builders.make_builder(dataset, data_dir, tfds_data_dir=tfds_data_dir,
                                             skip_bad=skip_bad)
        reused = builder.is_prepared()
        if not reused:
            import tensorflow_datasets as tfds

            older = tfds_builders.find_prepared(dataset, data_dir, tfds_data_dir=tfds_data_dir)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=str(data_dir)))
            if older is not None:
                log.info("%s: the copy prepared in format %s (%s) is no longer read; delete it to "
                         "free its disk", dataset, older.version, older.data_dir)
    metadata = builder.info.metadata
    skipped = {s: len(metadata["skipped"][s]) for s in metadata["skipped"]}
    if reused and any(skipped.values()) and not skip_bad:
        all_bad = [b for s in metadata["skipped"] for b in _skipped(metadata, s)]
        raise DatasetError(describe_bad(f"{dataset} in {data_dir}", all_bad)
                           + "\nFix the files, or prepare with --skip-bad to leave them out.")
    if any(skipped.values()):
        log.warning("%s: skipped bad records per split: %s", dataset, skipped)
    return PrepareResult(Path(builder.data_dir), {s: len(v) for s, v in metadata["labels"].items()},
                         skipped, {s: v[0] for s, v in metadata["dropped"].items()}, reused)
