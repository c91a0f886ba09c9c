"""Images/s of the training input pipeline for FER2013- and RAF-DB-format inputs.

    python scripts/benchmark_data.py [--records 6144] [--batch-size 256] [--workers 0,1,2]

FER2013 format: 48x48x1 uint8 records held in memory. RAF-DB format: 100x100x3 JPEGs
written to a temporary folder and decoded in __getitem__ by the readers' decoder
(`arm_jax.data.base.decode_image`, what a RAF-DB split does). Each configuration
runs one training epoch (flip/noise, erasing boxes, batching); the clock starts at the
first batch, so worker start-up is reported apart from throughput.

    python scripts/benchmark_data.py --datasets [--records 2048] [--markdown]

measures instead every data set as distributed (written by tests/fixtures.py's writers, at
realistic sizes: FER2013 48x48 grey, RAF-DB 100x100 JPEG, AffectNet photos of 400-700 px a
side with face boxes, the re-release's 224 px JPEGs), read raw and after `arm-jax prepare`:
one epoch with one grain worker process, the host CPU per training image (decode, crop,
augmentation, batching, hand-over) as microseconds, images/s, and the cores that 15,000
images/s (one H100-class GPU training ResNet-18) would need.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from arm_jax.data import pipeline, sampling, transforms
from arm_jax.data.base import decode_image

import results_table  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]

CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


class MemorySplit:
    """FER2013-like split: uint8 images in one array."""

    class_names = CLASSES

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        self.images, self.labels, self.name = images, labels.astype(np.int32), name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class JpegSplit:
    """RAF-DB-like split: one JPEG file per record, decoded on every read."""

    class_names = CLASSES

    def __init__(self, paths: list[str], labels: np.ndarray, name: str):
        self.paths, self.labels, self.name = paths, labels.astype(np.int32), name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": decode_image(Path(self.paths[i]), "RGB"), "label": self.labels[i]}


def _faces(rng: np.random.Generator, n: int, side: int, channels: int) -> np.ndarray:
    """Smooth random images (JPEG cost depends on content; pure noise would overstate it)."""
    coarse = rng.integers(0, 256, (n, side // 8, side // 8, channels), dtype=np.uint8)
    images = [np.asarray(Image.fromarray(c.squeeze(-1) if channels == 1 else c)
                         .resize((side, side), Image.BICUBIC)) for c in coarse]
    images = np.stack(images).reshape(n, side, side, channels)
    return np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)


def make_splits(records: int, folder: Path):
    """The two benchmark splits (the JPEG one written under `folder`)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), records)
    fer = MemorySplit(_faces(rng, records, 48, 1), labels, "fer2013-format")
    paths = []
    for i, image in enumerate(_faces(rng, records, 100, 3)):
        paths.append(str(folder / f"train_{i:05d}_aligned.jpg"))
        Image.fromarray(image).save(paths[-1], quality=90)
    return fer, JpegSplit(paths, labels, "raf_db-format")


def run_epoch(split, *, workers: int, resize_on: str, batch_size: int, image_size: int):
    """Start-up s, images/s after the first batch (wall, and per CPU-s of this process),
    and the bytes one image ships to the device."""
    start = time.perf_counter()
    loader = pipeline.make_loader(split, batch_size=batch_size, seed=0, epoch=0, train=True,
                                  image_size=image_size, worker_count=workers,
                                  shard_index=0, shard_count=1, resize_on=resize_on)
    iterator = pipeline.read_through(loader)  # closed at the end: no shared memory left behind
    first = next(iterator)
    ready, cpu_ready = time.perf_counter(), time.process_time()
    images = sum(len(batch["label"]) for batch in iterator)
    wall, cpu = time.perf_counter() - ready, time.process_time() - cpu_ready
    return ready - start, images / wall, images / cpu, first["image"][0].nbytes


def host_costs(split, image_size: int, repeats: int = 300) -> dict[str, float]:
    """CPU microseconds per record of each host step (process time: robust to other load)."""
    rng = np.random.default_rng(0)
    image = split[0]["image"]
    steps = {
        "read (decode)": lambda: split[0],
        "record rng": lambda: sampling.record_rng(0, 0, 1),
        "flip": lambda: transforms.flip_horizontal(image),
        "noise": lambda: transforms.add_gaussian_noise(image, rng),
        "erase box": lambda: transforms.sample_erase_box(rng, image_size),
        f"host resize to {image_size}x{image_size}x3": lambda: pipeline.StageImage(
            (image_size, image_size, 3))(image),
    }
    costs = {}
    for name, step in steps.items():
        start = time.process_time()
        for _ in range(repeats):
            step()
        costs[name] = (time.process_time() - start) / repeats * 1e6
    return costs


# The rate one GPU of the H100 class trains ResNet-18 + ARM at (issue 25's target).
GPU_IMAGES_PER_S = 15_000


def write_dataset(layout: str, root: Path, records: int, rng: np.random.Generator) -> str:
    """`records` training images of `layout` in its distributed format under `root` (a few
    for the other splits); returns the --dataset name that reads it."""
    sys.path.insert(0, str(REPO))  # tests/ from a checkout
    from tests import fixtures as fx

    others = 14  # validation and test records: `prepare` writes every split
    if layout in ("fer2013", "ferplus"):
        rows = [(i % 7, fx.random_image(rng, (48, 48)), "Training") for i in range(records)]
        rows += [(i % 7, fx.random_image(rng, (48, 48)), usage) for usage in ("PublicTest", "PrivateTest")
                 for i in range(others)]
        fx.write_fer2013_csv(root / "fer2013.csv", rows)
        if layout == "ferplus":
            votes = [[10 if j == i % 8 else 0 for j in range(10)] for i in range(len(rows))]
            fx.write_ferplus_csv(root / "fer2013new.csv", [(usage, f"fer{i:07d}.png", v) for i, ((_, _, usage), v)
                                                           in enumerate(zip(rows, votes, strict=True))])
        return layout
    if layout in ("fer2013_folder", "folder"):
        shape = (48, 48) if layout == "fer2013_folder" else (100, 100, 3)
        names = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
        splits = {"train": {name: [fx.random_image(rng, shape) for _ in range(records // 7)] for name in names},
                  "test": {name: [fx.random_image(rng, shape) for _ in range(others // 7)] for name in names}}
        fx.write_class_folders(root, splits)
        return layout
    if layout == "raf_db":
        entries = [(f"train_{i + 1:05d}.jpg", 1 + i % 7, fx.random_image(rng, (100, 100, 3))) for i in range(records)]
        entries += [(f"test_{i + 1:04d}.jpg", 1 + i % 7, fx.random_image(rng, (100, 100, 3))) for i in range(others)]
        fx.write_raf_db(root, entries)
        return layout
    if layout == "affectnet_csv":  # the original release: photos of any size, a face box per row
        def photo():
            return fx.random_image(rng, (int(rng.integers(400, 701)), int(rng.integers(400, 701)), 3))

        fx.write_affectnet_csv(root, {
            "training": [(f"{i // 1000}/{i:06d}.jpg", i % 7, photo()) for i in range(records)],
            "validation": [(f"v/{i:06d}.jpg", i % 7, photo()) for i in range(others)]})
        return "affectnet7"
    if layout == "affectnet_npy":  # the re-release: 224 px crops, labels in .npy files
        fx.write_affectnet_npy(root, {
            "train_set": [(i, i % 7, fx.random_image(rng, (224, 224, 3))) for i in range(records)],
            "val_set": [(i, i % 7, fx.random_image(rng, (224, 224, 3))) for i in range(others)]})
        return "affectnet7"
    raise ValueError(layout)


LAYOUTS = ("fer2013", "ferplus", "fer2013_folder", "raf_db", "affectnet_csv", "affectnet_npy", "folder")


def measure_datasets(args) -> list[dict]:
    """One row per layout: raw and prepared, with one worker process."""
    import tensorflow_datasets as tfds

    from arm_jax.data import open_split
    from arm_jax.data.prepared import PreparedSplit, prepare

    tfds.disable_progress_bar()

    stamp, rows = results_table.stamp(), []
    print(f"\n| data set | read | us per image | images/s per worker | cores for {GPU_IMAGES_PER_S:,} images/s "
          "| start-up s |\n|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory(prefix=f"benchmark-data-{layout}-") as folder:
            root, tfds_dir = Path(folder) / "data", Path(folder) / "tfds"
            dataset = write_dataset(layout, root, args.records, np.random.default_rng(0))
            prepare(dataset, root, tfds_data_dir=tfds_dir)
            cells = {}  # read -> (us per image, images/s, cores for GPU_IMAGES_PER_S)
            for read in ("raw", "prepared"):
                split = open_split(dataset, root, "train", prepared=read == "prepared", tfds_data_dir=tfds_dir)
                assert isinstance(split, PreparedSplit) == (read == "prepared"), (layout, read)
                startup, rate, _, _ = run_epoch(split, workers=1, resize_on="device",
                                                batch_size=args.batch_size, image_size=args.image_size)
                cells[read] = (f"{1e6 / rate:.0f}", f"{rate:,.0f}", str(math.ceil(GPU_IMAGES_PER_S / rate)))
                print(f"| {layout} | {read} | {' | '.join(cells[read])} | {startup:.1f} |", flush=True)
        columns = ("us per image, raw / prepared", "images/s per worker", f"cores for {GPU_IMAGES_PER_S:,} images/s")
        rows.append({**stamp, "run": f"{len(split)} records, batch {args.batch_size}, {args.image_size} px, 1 worker",
                     "data set": layout,
                     **{name: f"{cells['raw'][i]} / {cells['prepared'][i]}" for i, name in enumerate(columns)}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=None, help="training records (default 6144; 2048 with --datasets)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--datasets", action="store_true",
                        help="every data set as distributed, raw and prepared, with one worker (see above)")
    results_table.add_option(parser)
    args = parser.parse_args()
    if args.datasets:
        args.records = args.records or 2048
        rows = measure_datasets(args)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        if args.markdown:
            results_table.write_rows(args.markdown, "benchmark_data datasets", rows, key=("machine", "data set"))
        return
    args.records = args.records or 6144
    workers = [int(w) for w in args.workers.split(",")]
    print(f"os.cpu_count() = {os.cpu_count()}; {args.records} records per epoch, "
          f"batch {args.batch_size}, image_size {args.image_size}; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    stamp, run = results_table.stamp(), f"{args.records} records, batch {args.batch_size}, {args.image_size} px"
    cost_rows, rate_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        splits = make_splits(args.records, Path(folder))
        print("\nCPU us per record on the host:")
        for split in splits:
            costs = host_costs(split, args.image_size)
            print(f"  {split.name}: " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
            cost_rows.append({**stamp, "run": f"{split.name}, {args.image_size} px",
                              **{f"{k.split(' to ')[0]} us": f"{v:.0f}" for k, v in costs.items()}})
        print("\n| input | resize_on | workers | bytes/image | start-up s | images/s total "
              "| images/s per worker | images per CPU-s of the main process |\n"
              "|---|---|---|---|---|---|---|---|")
        for split in splits:
            for resize_on in ("device", "host"):
                for w in workers:
                    startup, rate, cpu_rate, nbytes = run_epoch(
                        split, workers=w, resize_on=resize_on, batch_size=args.batch_size,
                        image_size=args.image_size)
                    print(f"| {split.name} | {resize_on} | {w} | {nbytes} | {startup:.1f} "
                          f"| {rate:.0f} | {rate / max(w, 1):.0f} | {cpu_rate:.0f} |", flush=True)
                    rate_rows.append({**stamp, "run": run, "input": split.name, "resize on": resize_on,
                                      "workers": str(w), "images/s": f"{rate:,.0f}",
                                      "images/s per worker": f"{rate / max(w, 1):,.0f}",
                                      "start-up s": f"{startup:.1f}"})
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.markdown:
        results_table.write_rows(args.markdown, "benchmark_data host", cost_rows)
        results_table.write_rows(args.markdown, "benchmark_data", rate_rows)


if __name__ == "__main__":
    main()
