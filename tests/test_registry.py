"""data/registry.py: every data set is one DatasetSpec. A data set added here, in the test alone
(a made-up 'list file' format: one `path label` line per image, per split), is read raw, prepared,
fingerprinted and batched by the library without a change anywhere else."""

from pathlib import Path

import numpy as np
import pytest

from arm_jax.data import open_split, registry
from arm_jax.data.base import Records, check_image_paths
from arm_jax.data.pipeline import make_loader
from arm_jax.data.prepared import PreparedSplit, prepare
from arm_jax.data.sources import decode_size_hint
from arm_jax.errors import DatasetError, UserError
from tests import fixtures as fx
from tests.test_prepare import assert_same

CLASSES = ("anger", "happiness", "neutral")


def read_list_file(data_dir: Path, split: str, problems, check_images: bool) -> Records:
    """The made-up format: DATA_DIR/<split>.txt lines 'images/x.png 2'; 'val' reads test.txt."""
    listing = data_dir / f"{'test' if split == 'val' else split}.txt"
    if not listing.is_file():
        raise DatasetError(f"list_file: {listing} not found")
    rows = [line.split() for line in listing.read_text().splitlines() if line.strip()]
    paths, labels = [path for path, _ in rows], [int(label) for _, label in rows]
    keep = check_image_paths(data_dir, paths, [(data_dir / p, n + 1) for n, p in enumerate(paths)], problems,
                             check_content=check_images)
    return Records(CLASSES, np.asarray(labels, np.int32)[keep], root=data_dir,
                   paths=[p for p, k in zip(paths, keep) if k])


@pytest.fixture
def list_file(monkeypatch):
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # the test's addition ends with it
    return registry.register(registry.DatasetSpec(
        "list_file", read_list_file, lambda d: ([d / "train.txt", d / "test.txt"], [d / "images"]),
        builder="arm_folder", how_to_get="made up for this test"))


def _write(root: Path, rng) -> Path:
    for split, count in (("train", 9), ("test", 6)):
        lines = []
        for i in range(count):
            path = fx.write_image(root / "images" / f"{split}{i}.png", fx.random_image(rng, (40, 40, 3)))
            lines.append(f"{path.relative_to(root)} {i % len(CLASSES)}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_data_set_added_in_one_place_is_read_prepared_and_batched(tmp_path, rng, list_file):
    data, tfds_dir = _write(tmp_path / "data", rng), tmp_path / "tfds"
    assert "list_file" in registry.names() and decode_size_hint("list_file", 64) is None
    raw = open_split("list_file", data, "train", prepared=False)
    assert raw.class_names == CLASSES and raw.labels.tolist() == [0, 1, 2] * 3
    np.testing.assert_array_equal(raw[4]["image"], np.asarray(fx.Image.open(data / "images" / "train4.png")))
    result = prepare("list_file", data, tfds_data_dir=tfds_dir)
    assert result.sizes == {"train": 9, "val": 6, "test": 6} and "arm_folder" in str(result.path)
    for split in ("train", "val", "test"):
        assert_same(open_split("list_file", data, split, tfds_data_dir=tfds_dir),
                    open_split("list_file", data, split, prepared=False))
    (data / "train.txt").write_text((data / "train.txt").read_text().replace(" 0\n", " 1\n", 1))  # relabelled
    assert not isinstance(open_split("list_file", data, "train", tfds_data_dir=tfds_dir), PreparedSplit)
    batch = next(iter(make_loader(open_split("list_file", data, "train", prepared=False), batch_size=4, seed=0,
                                  epoch=0, train=True, image_size=32)))
    assert batch["image"].shape[0] == 4 and set(batch["label"].tolist()) <= {0, 1, 2}


def test_names_are_unique_and_an_unknown_one_names_the_choices(list_file):
    with pytest.raises(ValueError, match="registered already"):
        registry.register(list_file)
    with pytest.raises(UserError, match="unknown dataset 'nope'; choose one of .*list_file.*synthetic"):
        open_split("nope", "somewhere", "train")
    assert registry.names()[-1] == registry.SYNTHETIC
    assert {"fer2013", "ferplus", "fer2013_folder", "raf_db", "affectnet7", "affectnet8", "folder"} <= set(
        registry.names())
