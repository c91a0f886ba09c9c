"""Write scikit-learn's handwritten digits 0-6 as a data set arm-jax reads: real images, seven classes, any CPU.

    pip install scikit-learn
    python scripts/write_digits.py fer2013 data/digits                # data/digits/fer2013.csv
    python scripts/write_digits.py raf_db data/digits-raf --train-per-class 30 --test-per-class 10
                                                 # data/digits-raf/RAF-DB/basic/{EmoLabel,Image/aligned}

fer2013: the 8x8 digits (0..16) scaled to 0..255 and resized to 48x48 gray (PIL bilinear), digit d
as label d, shuffled with --seed and split 70/15/15 into Training / PublicTest / PrivateTest.
raf_db: the same digits as 100x100 RGB JPEGs in RAF-DB's distributed layout (digit d as RAF-DB
label d + 1), under RAF-DB/basic/ so that `arm-jax reproduce --data-root` finds it.
A stand-in for a facial expression data set, for trying whole training runs
(scripts/compare_training.py, scaled-down `arm-jax reproduce`) on images no one here drew.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 7
FER_SPLIT = (("Training", 0.70), ("PublicTest", 0.15), ("PrivateTest", 0.15))


def shuffled_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 8x8 images scaled to 0..255, labels) of the digits 0-6, in a seeded order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < CLASSES
    images, labels = digits.images[keep], digits.target[keep]
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.rint(images[order] * (255.0 / 16.0)).astype(np.uint8), labels[order].astype(int)


def resized(image: np.ndarray, size: int, mode: str = "L") -> Image.Image:
    return Image.fromarray(image).resize((size, size), Image.BILINEAR).convert(mode)


def write_fer2013(out: Path, seed: int) -> str:
    images, labels = shuffled_digits(seed)
    bounds = [0, *np.cumsum([round(share * len(labels)) for _, share in FER_SPLIT[:-1]]), len(labels)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("emotion", "pixels", "Usage"))
        for (usage, _), start, stop in zip(FER_SPLIT, bounds[:-1], bounds[1:]):
            for image, label in zip(images[start:stop], labels[start:stop]):
                writer.writerow((label, " ".join(map(str, np.asarray(resized(image, 48)).ravel())), usage))
    counts = {usage: int(stop - start) for (usage, _), start, stop in zip(FER_SPLIT, bounds[:-1], bounds[1:])}
    return f"{out / 'fer2013.csv'}: {len(labels)} digits, {counts}"


def write_raf_db(out: Path, seed: int, train_per_class: int, test_per_class: int) -> str:
    images, labels = shuffled_digits(seed)
    root = out / "RAF-DB" / "basic"
    (root / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    taken = np.zeros(CLASSES, int)
    lines, names = [], {"train": 0, "test": 0}
    for image, label in zip(images, labels):
        if taken[label] >= train_per_class + test_per_class:
            continue
        split = "train" if taken[label] < train_per_class else "test"
        taken[label] += 1
        names[split] += 1
        stem = f"train_{names['train']:05d}" if split == "train" else f"test_{names['test']:04d}"
        resized(image, 100, "RGB").save(root / "Image" / "aligned" / f"{stem}_aligned.jpg", quality=95)
        lines.append(f"{stem}.jpg {label + 1}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(sorted(lines)) + "\n")
    return f"{root}: {names['train']} training and {names['test']} test images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=("fer2013", "raf_db"))
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=120, help="raf_db only")
    parser.add_argument("--test-per-class", type=int, default=30, help="raf_db only")
    args = parser.parse_args()
    if args.layout == "fer2013":
        print("wrote", write_fer2013(args.out, args.seed))
    else:
        print("wrote", write_raf_db(args.out, args.seed, args.train_per_class, args.test_per_class))


if __name__ == "__main__":
    main()
