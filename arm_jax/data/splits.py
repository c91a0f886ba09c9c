"""open_split: any supported data set's split as a LabelledSplit, prepared or read raw.

`arm-jax prepare` decodes every image once, writes ArrayRecord files, and is then what
open_split uses: faster to open, uniform, and fully verified. Prepared data is only used
while it matches the source files' fingerprint; otherwise open_split reads the raw files
(and logs that it does).
"""

from __future__ import annotations

import logging
from pathlib import Path

from arm_jax.data.base import LabelledSplit
from arm_jax.data.sources import check_names, data_dir_of, open_raw

log = logging.getLogger(__name__)


def open_split(dataset: str, data_dir: str | Path | None, split: str, *, skip_bad: bool = False,
               prepared: bool = True, image_size_hint: int | None = None,
               tfds_data_dir: str | Path | None = None) -> LabelledSplit:
    """A data set's split as a LabelledSplit.

    Args:
      dataset: one of DATASETS. "synthetic" ignores data_dir and needs no files.
      data_dir: the folder holding the data set as distributed.
      split: "train", "val" or "test". Data sets without a validation split (RAF-DB,
        AffectNet, the FER2013 folder release) give their test set for "val".
      skip_bad: leave out bad records (logged, and listed in `split.report`) instead of
        raising a DatasetError that lists them.
      prepared: use data written by `prepare` when it exists and matches the source files.
      image_size_hint: file-based splits resize images to this square size when decoding
        (AffectNet's images differ in size); array-backed splits keep their native size.
      tfds_data_dir: where prepared data lives (default: $TFDS_DATA_DIR, else TFDS's default).
    """
    check_names(dataset, split)
    if prepared and dataset != "synthetic":
        from arm_jax.data import prepared  # imports tfds: slow, so only here

        split_ = prepared.open_prepared(dataset, data_dir_of(dataset, data_dir), split,
                                             skip_bad=skip_bad, tfds_data_dir=tfds_data_dir,
                                             image_size_hint=image_size_hint)
        if split_ is not None:
            return split_
        log.info("%s: no current prepared data; reading the raw files (`arm-jax prepare` makes "
                 "opening faster and checks every image)", dataset)
    return open_raw(dataset, data_dir, split, skip_bad=skip_bad, image_size_hint=image_size_hint)
