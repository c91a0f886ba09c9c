"""Images/s of the training input pipeline for FER2013- and RAF-DB-format inputs.

    python scripts/benchmark_data.py [--records 3072] [--batch-size 256] [--workers 0,1,2]

FER2013 format: 48x48x1 uint8 records held in memory. RAF-DB format: 100x100x3 JPEGs
written to a temporary folder and decoded with PIL in __getitem__. Each configuration
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

from arm_jax.data import pipeline, transforms

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
        with Image.open(self.paths[i]) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": self.labels[i]}


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
    """(start-up seconds, images/s after the first batch, bytes per image shipped)."""
    start = time.perf_counter()
    loader = pipeline.make_loader(split, batch_size=batch_size, seed=0, epoch=0, train=True,
                                  image_size=image_size, worker_count=workers,
                                  shard_index=0, shard_count=1, resize_on=resize_on)
    iterator = iter(loader)
    first = next(iterator)
    ready = time.perf_counter()
    images = sum(len(batch["label"]) for batch in iterator)
    seconds = time.perf_counter() - ready
    return ready - start, images / seconds, first["image"][0].nbytes


def host_resize_cost(split, image_size: int, repeats: int = 200) -> float:
    """Microseconds to stage one record at image_size on the host (PIL bilinear)."""
    image = split[0]["image"]
    start = time.perf_counter()
    for _ in range(repeats):
        transforms.resize_uint8(transforms.to_channels(image, 3), image_size)
    return (time.perf_counter() - start) / repeats * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6144)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    print(f"os.cpu_count() = {os.cpu_count()}; {args.records} records per epoch, "
          f"batch {args.batch_size}, image_size {args.image_size}; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    with tempfile.TemporaryDirectory() as folder:
        splits = make_splits(args.records, Path(folder))
        for split in splits:
            print(f"host staging of one {split.name} record to {args.image_size}x"
                  f"{args.image_size}x3: {host_resize_cost(split, args.image_size):.0f} us")
        print(f"\n| input | resize_on | workers | bytes/image | start-up s | images/s total "
              f"| images/s per worker |\n|---|---|---|---|---|---|---|")
        for split in splits:
            for resize_on in ("device", "host"):
                for w in workers:
                    startup, rate, nbytes = run_epoch(
                        split, workers=w, resize_on=resize_on, batch_size=args.batch_size,
                        image_size=args.image_size)
                    print(f"| {split.name} | {resize_on} | {w} | {nbytes} | {startup:.1f} "
                          f"| {rate:.0f} | {rate / max(w, 1):.0f} |", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
