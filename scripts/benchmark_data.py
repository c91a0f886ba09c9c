"""Images/s of the training input pipeline for FER2013- and RAF-DB-format inputs.

    python scripts/benchmark_data.py [--records 6144] [--batch-size 256] [--workers 0,1,2]

FER2013 format: 48x48x1 uint8 records held in memory. RAF-DB format: 100x100x3 JPEGs
written to a temporary folder and decoded in __getitem__ by the readers' decoder
(`arm_jax.data.base.decode_image`, what a RAF-DB split does). Each configuration
runs one training epoch (read, staging, batching: the augmentation is the device's); the
clock starts at the first batch, so worker start-up is reported apart from throughput.

    python scripts/benchmark_data.py --datasets [--records 2048] [--markdown]

measures instead every data set as distributed (written by tests/fixtures.py's writers, at
realistic sizes: FER2013 48x48 grey, RAF-DB 100x100 JPEG, AffectNet photos of 400-700 px a
side with face boxes, the re-release's 224 px JPEGs), read raw and after `arm-jax prepare`:
one epoch with one grain worker process, the host CPU per training image (decode, crop,
staging, batching, hand-over) as microseconds, images/s, and the cores that 15,000
images/s (one H100-class GPU training ResNet-18) would need; then where one image's
microseconds go: reading it (`split[i]`: decode, crop), staging it, and the rest (grain's
per-record work, batching, the hand-over from the worker).

    python scripts/benchmark_data.py --step [--image-size 112] [--markdown]

times the training step with the augmentation on the device and without any (the step of
`arm-jax train` on ARM-ResNet-18, batch 32, RAF-DB-sized 100x100 images resized in the
step), interleaved in one process: what moving flip, noise and erasing onto the device costs.
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

from arm_jax.data import pipeline
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


def run_epoch(split, *, workers: int, batch_size: int, image_size: int):
    """Start-up s, images/s from the first batch to the last (wall, and per CPU-s of this process),
    and the bytes one image ships to the device. The loader's shutdown (its workers, its shared
    memory) comes after the clock stops."""
    start = time.perf_counter()
    loader = pipeline.make_loader(split, batch_size=batch_size, seed=0, epoch=0, train=True,
                                  image_size=image_size, worker_count=workers,
                                  shard_index=0, shard_count=1)
    steps = pipeline.steps_in_epoch(split, batch_size, sampler="shuffle", train=True)
    iterator = iter(loader)
    try:
        nbytes = next(iterator)["image"][0].nbytes  # no batch outlives the loader: close unlinks them all
        ready, cpu_ready = time.perf_counter(), time.process_time()
        # The epoch's batches, counted: the end of grain's stream (StopIteration) takes its
        # workers up to a second to signal, and training never reaches it (one loader serves
        # all epochs, and the loop asks for each epoch's steps).
        images = sum(len(next(iterator)["label"]) for _ in range(steps - 1))
        wall, cpu = time.perf_counter() - ready, time.process_time() - cpu_ready
    finally:
        pipeline.close_iterator(iterator)  # no worker or shared memory left behind
    return ready - start, images / wall, images / cpu, nbytes


def host_costs(split, image_size: int, records: int = 300) -> dict[str, float]:
    """CPU microseconds per record of reading (split[i]: decode, crop) and of staging (the loader's
    StageImage), over the first `records` records (process time: robust to other load)."""
    stage = pipeline.StageImage(pipeline._staging_shape(split, image_size, None))
    indices = range(min(records, len(split)))
    start = time.process_time()
    images = [split[i]["image"] for i in indices]
    read = time.process_time() - start
    start = time.process_time()
    for image in images:
        stage(image)
    staged = time.process_time() - start
    return {"read": read / len(images) * 1e6, "stage": staged / len(images) * 1e6}


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
# Training images of the real data sets whose prepared images would not fit one pixel array
# (tfds_builders.PIXEL_ARRAY_MAX_BYTES, 4 GB): AffectNet's 283,901 (7 classes) at 224 x 224 x 3 are
# 43 GB. The benchmark's few thousand would fit, so it reads their records as the real set's are read.
TOO_LARGE_FOR_A_PIXEL_ARRAY = ("affectnet_csv", "affectnet_npy")


def measure_datasets(args) -> list[dict]:
    """One row per layout: raw and prepared, with one worker process, and where the time goes."""
    import tensorflow_datasets as tfds

    from arm_jax.data import open_split
    from arm_jax.data.prepared import PreparedSplit, prepare
    from arm_jax.data.sources import decode_size_hint

    tfds.disable_progress_bar()

    stamp, rows = results_table.stamp(), []
    print(f"\n| data set | read | us per image | images/s per worker | cores for {GPU_IMAGES_PER_S:,} images/s "
          "| read us | stage us | rest us | start-up s |\n|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts:
        with tempfile.TemporaryDirectory(prefix=f"benchmark-data-{layout}-") as folder:
            root, tfds_dir = Path(folder) / "data", Path(folder) / "tfds"
            dataset = write_dataset(layout, root, args.records, np.random.default_rng(0))
            prepare(dataset, root, tfds_data_dir=tfds_dir)
            cells = {}  # read -> (us per image, images/s, cores for GPU_IMAGES_PER_S, read, stage, rest)
            for read in ("raw", "prepared"):
                # As training opens it: data sets of many image sizes decode at the model's size.
                split = open_split(dataset, root, "train", prepared=read == "prepared", tfds_data_dir=tfds_dir,
                                   image_size_hint=decode_size_hint(dataset, args.image_size))
                assert isinstance(split, PreparedSplit) == (read == "prepared"), (layout, read)
                if read == "prepared" and layout in TOO_LARGE_FOR_A_PIXEL_ARRAY:
                    split.pixels_path = None
                startup, rate, _, _ = run_epoch(split, workers=1, batch_size=args.batch_size,
                                                image_size=args.image_size)
                costs = host_costs(split, args.image_size)
                rest = 1e6 / rate - costs["read"] - costs["stage"]
                cells[read] = (f"{1e6 / rate:.0f}", f"{rate:,.0f}", str(math.ceil(GPU_IMAGES_PER_S / rate)),
                               f"{costs['read']:.0f}", f"{costs['stage']:.0f}", f"{rest:.0f}")
                print(f"| {layout} | {read} | {' | '.join(cells[read])} | {startup:.1f} |", flush=True)
        columns = ("us per image, raw / prepared", "images/s per worker", f"cores for {GPU_IMAGES_PER_S:,} images/s",
                   "read us", "stage us", "rest us")
        rows.append({**stamp, "run": f"{len(split)} records, batch {args.batch_size}, {args.image_size} px, 1 worker",
                     "data set": layout,
                     **{name: f"{cells['raw'][i]} / {cells['prepared'][i]}" for i, name in enumerate(columns)}})
    return rows


def measure_step(args) -> list[dict]:
    """The training step with the device augmentation and without any, interleaved: seconds per step."""
    sys.path.insert(0, str(REPO))
    import arm_jax

    arm_jax.configure_cpu()
    import jax

    from arm_jax.interop.pretrained import init_variables
    from arm_jax.models import ARMResNet18
    from arm_jax.models.resnet import largest_activation_bytes
    from arm_jax.training.config import TrainConfig
    from arm_jax.training.optim import make_optimizer
    from arm_jax.training.state import TrainState
    from arm_jax.training.steps import make_train_step
    from arm_jax.xla_flags import training_compiler_options

    batch, size, native = 32, args.image_size, 100
    model = ARMResNet18(num_classes=len(CLASSES), image_size=size)
    variables = init_variables(model, jax.random.key(0))
    tx = make_optimizer(TrainConfig(), steps_per_epoch=100)
    state = TrainState.create(variables, tx)
    rng = np.random.default_rng(0)
    images = _faces(rng, batch, native, 3)
    data = {"image": images, "label": np.arange(batch, dtype=np.int32) % len(CLASSES),
            **pipeline.batch_positions(0, 0, batch_size=batch, shard_index=0, shard_count=1)}
    options = training_compiler_options(largest_activation_bytes(batch, size))
    steps = {name: jax.jit(make_train_step(model, tx, augment=augment), compiler_options=options)
             for name, augment in (("without augmentation", False), ("augmentation on the device", True))}
    times = {name: [] for name in steps}
    for round_ in range(args.rounds + 2):  # two warm-up rounds
        for name, step in steps.items():
            begin = time.perf_counter()
            jax.block_until_ready(step(state, data, jax.random.key(1)))
            if round_ >= 2:
                times[name].append(time.perf_counter() - begin)
    median = {name: float(np.median(t)) for name, t in times.items()}
    growth = median["augmentation on the device"] / median["without augmentation"] - 1
    print(f"training step, batch {batch}, {native}x{native}x3 images resized to {size} px, median of {args.rounds} "
          "interleaved rounds:")
    for name, seconds in median.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms ({batch / seconds:.1f} images/s)")
    print(f"  the augmentation adds {growth:+.1%}; load average {os.getloadavg()[0]:.1f}")
    return [{**results_table.stamp(), "run": f"batch {batch}, {native} px images, {size} px, {args.rounds} rounds",
             "without augmentation ms": f"{median['without augmentation'] * 1e3:.1f}",
             "augmentation on the device ms": f"{median['augmentation on the device'] * 1e3:.1f}",
             "growth": f"{growth:+.1%}"}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=None, help="training records (default 6144; 2048 with --datasets)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (112 with --step)")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--datasets", action="store_true",
                        help="every data set as distributed, raw and prepared, with one worker (see above)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS, help="--datasets: these only")
    parser.add_argument("--step", action="store_true", help="the training step with and without the augmentation")
    parser.add_argument("--rounds", type=int, default=15, help="--step: interleaved rounds (median)")
    results_table.add_option(parser)
    args = parser.parse_args()
    if args.step:
        args.image_size = args.image_size or 112
        rows = measure_step(args)
        if args.markdown:
            results_table.write_rows(args.markdown, "benchmark_data step", rows)
        return
    args.image_size = args.image_size or 224
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
    rate_rows = []
    with tempfile.TemporaryDirectory() as folder:
        splits = make_splits(args.records, Path(folder))
        print("\nCPU us per record on the host:")
        for split in splits:
            costs = host_costs(split, args.image_size)
            print(f"  {split.name}: " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
        print("\n| input | workers | bytes/image | start-up s | images/s total "
              "| images/s per worker | images per CPU-s of the main process |\n"
              "|---|---|---|---|---|---|---|")
        for split in splits:
            for w in workers:
                startup, rate, cpu_rate, nbytes = run_epoch(
                    split, workers=w, batch_size=args.batch_size, image_size=args.image_size)
                print(f"| {split.name} | {w} | {nbytes} | {startup:.1f} "
                      f"| {rate:.0f} | {rate / max(w, 1):.0f} | {cpu_rate:.0f} |", flush=True)
                rate_rows.append({**stamp, "run": run, "input": split.name, "workers": str(w),
                                  "images/s": f"{rate:,.0f}", "images/s per worker": f"{rate / max(w, 1):,.0f}",
                                  "start-up s": f"{startup:.1f}"})
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.markdown:
        results_table.write_rows(args.markdown, "benchmark_data", rate_rows)


if __name__ == "__main__":
    main()
