"""Per-image read cost of the ways `prepare` could store AffectNet's face crops (issue 25).

    python scripts/benchmark_crop_formats.py [--crops 300] [--repeats 5] [--size 224]

Crops: regions of scikit-image's bundled photos (astronaut, coffee, rocket, chelsea, retina,
hubble, immunohistochemistry) shaped like AffectNet's face boxes (aspect 0.8-1.25), 80% larger
than affectnet.CROP_MAX_SIDE and so capped to it (as most AffectNet boxes are), 20% of
120-255 px. Each candidate stores every crop, then the clock runs over decode + the resize to
`--size` square (PIL BILINEAR, the loader's `resize_uint8`) that reading then needs, one thread;
the best of `--repeats` passes, in microseconds per image, and the mean bytes per record. The
mean and max absolute pixel difference is against the lossless crop resized to `--size` (what
the raw reader gives the model). Decoders: PIL (what `decode_image` uses) and OpenCV's imdecode.

    python scripts/benchmark_crop_formats.py --pipeline [--records 2048]

instead writes an AffectNet CSV data set (photos of 400-700 px, regions of the same photos, with
a face box inside AffectNet's margin), prepares it with the `arm_jax` on the path (PYTHONPATH=a
checkout of another commit measures its format) and reads the training split's records through
the loader as the host will once augmentation moves to the device: evaluation batches of 256
(read + decode + staging resize to 224 + batching), images/s after the first batch, with one
grain worker process and in-process; the same from the split's pixel array where prepare wrote
one (no decode: the rest of the pipeline); and the bytes of the training records on disk.
"""

import argparse
import io
import time

import cv2
import numpy as np
import skimage.data
from PIL import Image

from arm_jax.data.base import decode_image, resize_uint8
from arm_jax.data.readers.affectnet import CROP_MAX_SIDE

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "retina", "hubble_deep_field",
          "immunohistochemistry")


def crops(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` face-box-shaped regions of real photos, capped at CROP_MAX_SIDE like face_crop."""
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        aspect = rng.uniform(0.8, 1.25)
        limit = min(photo.shape[0], photo.shape[1] / aspect)
        big = rng.random() < 0.8 and limit > CROP_MAX_SIDE + 1
        height = int(rng.integers(CROP_MAX_SIDE + 1, limit) if big else rng.integers(120, CROP_MAX_SIDE))
        width = min(int(height * aspect), photo.shape[1])
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        crop = photo[top:top + height, left:left + width]
        scale = min(1.0, CROP_MAX_SIDE / max(height, width))
        out.append(resize_uint8(crop, max(1, round(height * scale)), max(1, round(width * scale))))
    return out


def jpeg(image: np.ndarray, quality: int, subsampling: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")  # what prepare wrote at FORMAT_VERSION 1.1.0
    return buffer.getvalue()


def cv2_read(data: bytes, size: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    return resize_uint8(image, size)


def candidates(size: int):
    """name -> (encode crop -> record bytes, read record bytes -> size x size x 3 uint8)."""
    pil_read = lambda data: resize_uint8(decode_image(data, "RGB"), size)  # noqa: E731
    readers = {"PIL": pil_read, "cv2": lambda data: cv2_read(data, size)}
    table = {"png (1.1.0), crop size, PIL": (png, pil_read)}
    for side in (None, size, CROP_MAX_SIDE):
        shape = "crop size" if side is None else f"{side}x{side}"
        stage = (lambda c: c) if side is None else (lambda c, s=side: resize_uint8(c, s))
        for quality, subsampling in ((90, 2), (95, 2), (90, 0), (95, 0)):
            if side == CROP_MAX_SIDE and (quality, subsampling) != (95, 2):
                continue
            chroma = "4:2:0" if subsampling == 2 else "4:4:4"
            encode = lambda c, q=quality, s=subsampling, st=stage: jpeg(st(c), q, s)  # noqa: E731
            for decoder, read in readers.items():
                table[f"jpeg q{quality} {chroma}, {shape}, {decoder}"] = (encode, read)
    for side in (None, size):
        shape = "crop size" if side is None else f"{side}x{side}"
        table[f"raw uint8, {shape}"] = (
            lambda c, s=side: raw(c if s is None else resize_uint8(c, s)),
            lambda d: resize_uint8(np.frombuffer(d, np.uint8, offset=4).reshape(
                *np.frombuffer(d[:4], np.uint16), 3), size))
    return table


def raw(image: np.ndarray) -> bytes:
    """Height and width as two uint16, then the pixels."""
    return np.array(image.shape[:2], np.uint16).tobytes() + image.tobytes()


def pipeline_rate(records: int, size: int) -> None:
    """Prepare an AffectNet CSV data set and time one worker's evaluation pass over it."""
    import sys
    import tempfile
    from pathlib import Path

    from arm_jax.data import pipeline
    from arm_jax.data.prepared import prepare
    from arm_jax.data.splits import open_split

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ from a checkout
    from tests import fixtures as fx

    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]

    def photo(i):
        side = int(rng.integers(400, 701))
        source = photos[i % len(photos)]
        return resize_uint8(source, side, int(side * rng.uniform(0.8, 1.25)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fx.write_affectnet_csv(root / "an", {
            "training": [(f"{i // 1000}/{i:06d}.jpg", i % 7, photo(i)) for i in range(records)],
            "validation": [(f"v/{i:06d}.jpg", i % 7, photo(i)) for i in range(14)]})
        result = prepare("affectnet7", root / "an", tfds_data_dir=root / "tfds")
        on_disk = sum(p.stat().st_size for p in result.path.glob("*-train.array_record*"))
        split = open_split("affectnet7", root / "an", "train", tfds_data_dir=root / "tfds")
        rates = {}
        for source in ("records", "pixel array"):
            if source == "records":  # as AffectNet's training split reads (more than 4 GB)
                split.pixels_path, pixels = None, split.pixels_path
            elif pixels is None:
                continue  # crops of several sizes (format 1.1.0): no array
            else:
                split.pixels_path = pixels  # no decode: the rest of the pipeline's cost
            for workers in (1, 0):
                loader = pipeline.make_loader(split, batch_size=256, seed=0, epoch=0, train=False,
                                              image_size=size, worker_count=workers)
                steps = pipeline.steps_in_epoch(split, 256, sampler="shuffle", train=False)
                iterator = iter(loader)
                try:
                    next(iterator)
                    start = time.perf_counter()
                    # The pass's batches, counted: grain's end of stream takes its workers up to a
                    # second to signal (training never reaches it); the loader closes after the clock.
                    images = sum(len(next(iterator)["label"]) for _ in range(steps - 1))
                    rates[source, workers] = images / (time.perf_counter() - start)
                finally:
                    pipeline.close_iterator(iterator)
    print(f"format {result.path.name}: {records} records, batch 256, {size} px; "
          f"{on_disk / records:,.0f} bytes per record")
    for (source, workers), rate in rates.items():
        where = "one worker" if workers else "in-process"
        print(f"  {source}, {where}: {rate:,.0f} images/s ({1e6 / rate:.0f} us per image)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--records", type=int, default=2048)
    args = parser.parse_args()
    if args.pipeline:
        pipeline_rate(args.records, args.size)
        return
    images = crops(args.crops, np.random.default_rng(0))
    reference = [resize_uint8(c, args.size).astype(np.int16) for c in images]
    print(f"{len(images)} crops, mean {np.mean([c.shape[0] for c in images]):.0f}x"
          f"{np.mean([c.shape[1] for c in images]):.0f} px; read = decode + resize to {args.size}")
    print("| form | us per image | bytes per record | mean / max abs diff vs lossless |")
    print("| --- | --- | --- | --- |")
    for name, (encode, read) in candidates(args.size).items():
        records = [encode(c) for c in images]
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = [read(r) for r in records]
            best = min(best, time.perf_counter() - start)
        diffs = [np.abs(o.astype(np.int16) - ref) for o, ref in zip(out, reference)]
        print(f"| {name} | {best / len(records) * 1e6:.0f} | {np.mean([len(r) for r in records]):,.0f} | "
              f"{np.mean([d.mean() for d in diffs]):.2f} / {max(d.max() for d in diffs)} |")


if __name__ == "__main__":
    main()
