"""Images/s of the training input pipeline for FER2013- and RAF-DB-format inputs.

    python scripts/benchmark_data.py [--records 3072] [--batch-size 256] [--workers 0,1,2]

FER2013 format: 48x48x1 uint8 records held in memory. RAF-DB format: 100x100x3 JPEGs
written to a temporary folder and decoded in __getitem__ by the readers' decoder
(`arm_jax.data.base.decode_image`, what a RAF-DB split does). Each configuration
runs one training epoch (flip/noise, erasing boxes, batching); the clock starts at the
first batch, so worker start-up is reported apart from throughput.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from arm_jax.data import pipeline, sampling, transforms
from arm_jax.data.base import decode_image

import results_table  # scripts/, beside this file

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6144)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2")
    results_table.add_option(parser)
    args = parser.parse_args()
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
